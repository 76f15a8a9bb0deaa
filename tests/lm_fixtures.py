"""A tiny causal LM made offline, for the data engine's ``--generator lm:DIR``: a 2-layer
GPT-2 with a byte-level BPE tokenizer trained here (nothing downloaded), fitted until it
reproduces given completions from their captions' prompts in the paper's format."""
from ip2p_jax.synth import instructions


def save_tiny_lm(folder, examples: dict[str, str], seed: int = 0) -> str:
  """Fits the model to ``caption -> completion`` (the text after
  ``instructions.lm_prompt(caption)``) and saves model and tokenizer to ``folder``."""
  import tokenizers
  import torch
  import transformers
  texts = [instructions.lm_prompt(c) + examples[c] for c in examples]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>")
  eos = fast.eos_token_id
  torch.manual_seed(seed)
  config = transformers.GPT2Config(vocab_size=len(fast), n_positions=128, n_embd=64, n_layer=2,
                                   n_head=2, bos_token_id=eos, eos_token_id=eos)
  model = transformers.GPT2LMHeadModel(config)
  batch = fast(texts, padding=True, return_tensors="pt")
  labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
  optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
  model.train()
  for _ in range(300):
    loss = model(**batch, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if loss.item() < 0.01:
      break
  assert loss.item() < 0.05, loss.item()
  model.eval().save_pretrained(folder)
  fast.save_pretrained(folder)
  return str(folder)
