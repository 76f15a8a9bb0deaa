"""The paper's data engine (Brooks, Holynski & Efros 2023, Sec. 3.1): captions become
training triplets for an instruction editor.

  instructions       caption -> (instruction, edited caption): a built-in grammar for the
                     shapes world and generic edits, or a causal language model in the
                     original's prompt format; unchanged or malformed results are rejected
  prompt_to_prompt   both captions drawn by a text-to-image pipeline from the same noise,
                     the first image's self-attention maps injected into the second for
                     the first p fraction of steps (Hertz et al. 2022), one jitted program
  clip_filter        the four CLIP similarities against the original's thresholds; the
                     best k pairs by direction similarity are kept
  engine             the whole job: the original folder format (``seeds.json``, one folder
                     per prompt with ``prompt.json`` and ``metadata.jsonl``), resumable by
                     prompt index, with a report and a contact sheet (``ip2p synth``)
"""
