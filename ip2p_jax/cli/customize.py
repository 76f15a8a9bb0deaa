"""``ip2p customize``: teach a model a new concept or edit style from a few examples,
written as one small adapter file (``ip2p edit --adapter``, ``pipe.load_adapter``)."""
from __future__ import annotations

import os

from ip2p_jax.cli.common import (CommandError, HelpFormatter, enable_compilation_cache,
                                 resolve_model)

EXAMPLES = """examples:
  ip2p customize --data striped/ --method custom_diffusion --token "<new1>" --init striped \\
      --out striped.safetensors
  ip2p customize --data cat/ --data dog/ --method lora --rank 8 --out pets.safetensors \\
      --base sd15-folder --prior regular/ --prior-weight 1.0
  ip2p edit photo.png -p "make it <new1>" -o out/ --adapter striped.safetensors:0.8

A data folder holds metadata.jsonl, one example per line, paths relative to it:
  {"input_image": "a.png", "edited_image": "a_out.png", "instruction": "make it <new1>"}
or, for a text-to-image --base, {"image": "b.png", "caption": "a <new1> square"}.
"""


def add_parser(sub) -> None:
  p = sub.add_parser("customize", help="train a LoRA or Custom Diffusion adapter",
                     epilog=EXAMPLES, formatter_class=HelpFormatter,
                     description="Fine-tune only an adapter (Custom Diffusion: cross-attention "
                     "keys/values and new tokens; LoRA: low-rank updates) on a few examples; "
                     "everything else stays frozen. Several --data folders train several "
                     "concepts jointly.")
  p.add_argument("--data", action="append", required=True, metavar="DIR",
                 help="example folder with metadata.jsonl (repeatable)")
  p.add_argument("--method", required=True, choices=["custom_diffusion", "lora"],
                 help="custom_diffusion: cross-attention keys/values and new tokens; lora: "
                      "low-rank updates of --targets")
  p.add_argument("--out", required=True, metavar="ADAPTER", help="adapter file to write "
                 "(.safetensors)")
  p.add_argument("--base", help="diffusers-format folder: an InstructPix2Pix editor or a "
                 "text-to-image model (default: the model bundled with ip2p_jax)")
  p.add_argument("--token", action="append", default=[], metavar="TOKEN",
                 help="new modifier token to add, e.g. '<new1>' (repeatable)")
  p.add_argument("--init", action="append", default=[], metavar="WORD",
                 help="word whose embedding a new token starts from (one, or one per --token)")
  p.add_argument("--steps", type=int, default=250, help="optimizer steps")
  p.add_argument("--lr", type=float, default=None,
                 help="learning rate (default: 1e-5 custom_diffusion, 1e-4 lora; with "
                      "--targets none 5e-3, --targets token_kv 2e-2)")
  p.add_argument("--batch-size", type=int, default=2, help="examples per step")
  p.add_argument("--rank", type=int, default=4, help="LoRA rank")
  p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
  p.add_argument("--targets", default="",
                 help="comma-separated layers: to_q,to_k,to_v,to_out_0 (attention), ff, conv "
                      "(default: to_k,to_v for custom_diffusion; to_q,to_k,to_v,to_out_0 "
                      "for lora); 'none' with custom_diffusion and --token: only the new "
                      "tokens train (textual inversion), so prompts without them edit "
                      "exactly as the base does; 'token_kv' with custom_diffusion and --token: "
                      "the tokens and, per cross-attention layer, a key and a value row added "
                      "where they sit (ip2p_jax.adapters.token_kv; prompts without them edit "
                      "as the base does, to float rounding)")
  p.add_argument("--prior", action="append", default=[], metavar="DIR",
                 help="regularisation examples (prior preservation; repeatable)")
  p.add_argument("--prior-weight", type=float, default=1.0, help="weight of --prior's loss")
  p.add_argument("--resolution", type=int, default=None,
                 help="training size in pixels (default: the base's native size)")
  p.add_argument("--seed", type=int, default=0, help="seed of the batches, noise and LoRA init")
  p.add_argument("--diffusers-dir", metavar="DIR",
                 help="custom_diffusion: also write the adapter in diffusers' own layout to DIR "
                      "(pytorch_custom_diffusion_weights.safetensors, one <token>.safetensors "
                      "per new token; ip2p_jax.adapters.diffusers_format). LoRA files are "
                      "already in diffusers' layout")
  p.add_argument("--no-compilation-cache", action="store_true",
                 help="do not use JAX's persistent compilation cache (a rerun with the same "
                      "settings then compiles the train step again)")
  p.set_defaults(run=run)


def run(args) -> int:
  from ip2p_jax.adapters import runner
  base = resolve_model(args.base)
  for folder in args.data + args.prior:
    if not os.path.isfile(os.path.join(folder, "metadata.jsonl")):
      raise CommandError(f"{folder}: no metadata.jsonl (see ip2p customize -h)")
  if not args.out.endswith(".safetensors"):
    raise CommandError(f"--out {args.out}: adapter files end in .safetensors")
  if args.steps < 1 or args.batch_size < 1:
    raise CommandError("--steps and --batch-size must be >= 1")
  if args.diffusers_dir and args.method != "custom_diffusion":
    raise CommandError("--diffusers-dir is for custom_diffusion adapters: a LoRA file is "
                       "already in diffusers' LoRA layout (pipe.load_lora_weights)")
  if args.diffusers_dir and "token_kv" in args.targets.split(","):
    raise CommandError("--diffusers-dir: diffusers has no key/value token rows; the "
                       "adapter file is ip2p_jax's own")
  if args.token and not args.init:
    raise CommandError("--token needs --init WORD: the word each new token starts from")
  if not args.no_compilation_cache:
    enable_compilation_cache()
  settings = runner.Settings(
      method=args.method, steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
      rank=args.rank, alpha=args.alpha, targets=args.targets, tokens=tuple(args.token),
      initializer=tuple(args.init), prior_weight=args.prior_weight,
      resolution=args.resolution, seed=args.seed)
  result = runner.customize(base, args.data, args.out, settings, prior=args.prior or None)
  print(f"{args.method} adapter from {result['examples']} examples in "
        f"{result['seconds']:.0f} s (loss {result['loss']:.4f}): {args.out} "
        f"({result['bytes'] / 1024:.0f} KiB)")
  if args.diffusers_dir:
    from ip2p_jax.adapters import diffusers_format
    from ip2p_jax.checkpoints import load_pipeline
    written = diffusers_format.save(args.diffusers_dir, args.out, load_pipeline(base))
    print(f"diffusers layout: {', '.join(written)}")
  return 0
