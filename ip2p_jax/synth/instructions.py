"""Instruction generation: a caption becomes (instruction, edited caption).

The paper fine-tuned GPT-3 on 700 human-written examples in the format
``caption + "\\n##\\n"`` -> ``instruction + "\\n%%\\n" + edited caption + "\\nEND"`` and
sampled at temperature 0.7, rejecting edits whose caption did not change. Two
generators share those rules (:func:`check`):

  BuiltinGenerator         a grammar: shapes-world captions (``data.shapes``) are parsed
                           into a scene, edited with the shapes world's own edits and
                           templates and captioned again; other captions get generic
                           edits (colour, object swap, style, season/time, add/remove)
  LanguageModelGenerator   a transformers causal LM from a local folder, prompted in the
                           original format (``pip install -e ".[lm]"``)

Both are deterministic in ``(seed, index)``, the caption's position in the caption file,
so a resumed run proposes the same edits.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from ip2p_jax.data import shapes

PROMPT_SEPARATOR = "\n##\n"
EDIT_SEPARATOR = "\n%%\n"
END = "\nEND"
MAX_CHARS = 300  # longer than any caption CLIP reads (77 tokens)


@dataclasses.dataclass(frozen=True)
class Proposal:
  """One caption's edit; ``rejected`` says why it cannot be used (None: usable)."""
  caption: str
  instruction: str
  edited_caption: str
  rejected: str | None = None
  kind: str = ""  # the built-in edit's type ("recolor", "style", ...); "" from a model


def _normalized(text: str) -> str:
  return re.sub(r"\s+", " ", text).strip().strip(".").lower()


def check(caption: str, instruction: str, edited_caption: str) -> str | None:
  """Why an edit is unusable ("empty", "malformed", "too long", "unchanged"), or None."""
  instruction, edited_caption = instruction.strip(), edited_caption.strip()
  if not instruction or not edited_caption:
    return "empty"
  text = instruction + edited_caption
  if any(mark in text for mark in ("##", "%%", "\n", "\r")) or not text.isprintable():
    return "malformed"
  if len(instruction) > MAX_CHARS or len(edited_caption) > MAX_CHARS:
    return "too long"
  if _normalized(edited_caption) == _normalized(caption):
    return "unchanged"
  return None


def proposal(caption: str, instruction: str, edited_caption: str, kind: str = "") -> Proposal:
  instruction, edited_caption = instruction.strip(), edited_caption.strip()
  return Proposal(caption, instruction, edited_caption,
                  check(caption, instruction, edited_caption), kind)


def _rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, index, 0x1D17])


# -- shapes-world captions -------------------------------------------------------------

_CAPTION = re.compile(r"(?P<things>.+) on an? (?P<background>[a-z]+)(?P<style> gradient| textured)?"
                      r" background(?P<effects>(, [a-z ]+)*)")
_OBJECT = re.compile(r"a (?P<size>[a-z]+) (?P<color>[a-z]+) (?P<shape>[a-z]+)")
_STYLES = {None: "plain", " gradient": "gradient", " textured": "texture"}
_EFFECTS = {text: name for name, text in shapes._EFFECT_CAPTIONS.items()}
SHAPES_EDITS = tuple(e for e in shapes.EDIT_TYPES if e != "move")  # captions carry no places


def parse_shapes_caption(caption: str) -> shapes.Scene | None:
  """The scene a shapes-world caption describes (objects at stand-in places in their
  left-to-right order), or None when the caption is not in the shapes grammar."""
  m = _CAPTION.fullmatch(caption.strip())
  if m is None or m["background"] not in shapes.PALETTE:
    return None
  names = re.split(r", | and ", m["things"])
  objects = []
  for k, name in enumerate(names):
    o = _OBJECT.fullmatch(name)
    if o is None or o["size"] not in shapes.SIZES or o["color"] not in shapes.PALETTE \
        or o["shape"] not in shapes.SHAPES:
      return None
    objects.append(shapes.Obj(o["shape"], o["color"], o["size"], (k + 0.5) / len(names), 0.5))
  effects = [e for e in (m["effects"] or "").split(", ") if e]
  if any(e not in _EFFECTS for e in effects):
    return None
  scene = shapes.Scene(m["background"], _STYLES[m["style"]], 0, tuple(objects),
                       tuple(_EFFECTS[e] for e in effects))
  return scene if shapes.caption(scene) == caption.strip() else None


def shapes_edit(scene: shapes.Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
  """(instruction, edited caption, edit type) by one of the shapes world's edits, tried in a random
  order until one applies."""
  for edit_type in rng.permutation(SHAPES_EDITS):
    result = shapes.random_edit(rng, scene, str(edit_type))
    if result is not None:
      edited, instruction, _ = result
      return instruction, shapes.caption(edited), str(edit_type)
  return None


# -- generic captions ------------------------------------------------------------------

COLOR_WORDS = tuple(shapes.COLORS) + ("brown", "gold", "silver")
SWAPS = {
    "cat": "dog", "dog": "cat", "car": "bicycle", "bicycle": "motorcycle", "horse": "zebra",
    "apple": "orange", "man": "woman", "woman": "man", "house": "castle", "boat": "ship",
    "bird": "butterfly", "chair": "sofa", "cup": "glass", "flower": "sunflower",
    "tree": "palm tree", "mountain": "volcano", "city": "village", "river": "road",
}
STYLES = (("make it a watercolor painting", "as a watercolor painting"),
          ("turn it into an oil painting", "as an oil painting"),
          ("make it a pencil sketch", "as a pencil sketch"),
          ("make it look like pixel art", "as pixel art"))
SEASONS = (("make it winter", "in winter"), ("make it autumn", "in autumn"),
           ("make it night", "at night"), ("make it sunset", "at sunset"))
ADDITIONS = (("add a rainbow", "a rainbow"), ("add fireworks", "fireworks"),
             ("add snow", "snow"), ("add a hot air balloon", "a hot air balloon"))


def _word(caption: str, words) -> list[re.Match]:
  pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
  return list(re.finditer(pattern, caption))


def _replace_span(text: str, m: re.Match, new: str) -> str:
  return text[:m.start()] + new + text[m.end():]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def generic_edits(caption: str, rng: np.random.Generator) -> list[tuple[str, str, str]]:
  """Every generic edit that applies to ``caption``, one (instruction, edited caption,
  kind) per kind: color, swap, remove, style, season, add."""
  c = caption.strip().rstrip(".")
  out = []
  colors = _word(c, COLOR_WORDS)
  if colors:
    m = colors[int(rng.integers(len(colors)))]
    new = str(rng.choice([w for w in COLOR_WORDS if w != m[0]]))
    noun = re.match(r"\s+([a-z]+)", c[m.end():])
    thing = f"{m[0]} {noun[1]}" if noun else m[0]
    out.append((f"make the {thing} {new}" if noun else f"make the {m[0]} parts {new}",
                _replace_span(c, m, new), "color"))
  nouns = _word(c, SWAPS)
  if nouns:
    m = nouns[int(rng.integers(len(nouns)))]
    new = SWAPS[m[0]]
    out.append((f"turn the {m[0]} into {_article(new)} {new}", _replace_span(c, m, new),
                "swap"))
  removable = re.search(r",? with (.+)$", c)
  if removable:
    thing = re.sub(r"^(a|an|some|the) ", "", removable[1])
    out.append((f"remove the {thing}", c[:removable.start()], "remove"))
  adding = " and " if " with " in c else " with "
  for kind, table, joiner in (("style", STYLES, ", "), ("season", SEASONS, " "),
                              ("add", ADDITIONS, adding)):
    instruction, phrase = table[int(rng.integers(len(table)))]
    if phrase not in c:
      out.append((instruction, f"{c}{joiner}{phrase}", kind))
  return out


class BuiltinGenerator:
  """Grammar and templates: shapes-world edits for shapes-world captions, generic edits
  otherwise; one random applicable edit per caption, deterministic in (seed, index)."""

  name = "builtin"

  def __init__(self, seed: int = 0):
    self.seed = seed

  def __call__(self, caption: str, index: int) -> Proposal:
    rng = _rng(self.seed, index)
    scene = parse_shapes_caption(caption)
    if scene is not None:
      edit = shapes_edit(scene, rng)
    else:
      edits = generic_edits(caption, rng)
      edit = edits[int(rng.integers(len(edits)))] if edits else None
    if edit is None:
      return Proposal(caption, "", "", "no edit applies")
    return proposal(caption, *edit)


# -- a language model ------------------------------------------------------------------

def lm_prompt(caption: str) -> str:
  """The original's prompt: the caption, then the separator the model continues after."""
  return caption.strip() + PROMPT_SEPARATOR


def parse_completion(caption: str, completion: str) -> Proposal:
  """``instruction \\n%%\\n edited caption \\nEND`` (the text after the prompt) -> a
  :class:`Proposal`; a completion without ``\\nEND`` or with other than one ``\\n%%\\n``
  before it is rejected as "malformed"."""
  if END not in completion:
    return Proposal(caption, "", "", "malformed")
  body = completion.split(END, 1)[0]
  parts = body.split(EDIT_SEPARATOR)
  if len(parts) != 2:
    return Proposal(caption, "", "", "malformed")
  return proposal(caption, parts[0], parts[1])


class LanguageModelGenerator:
  """A transformers causal LM (``AutoModelForCausalLM`` and its tokenizer) from a local
  folder, sampled at ``temperature`` in the original's prompt format. ``tries`` samples
  per caption until one passes :func:`check`. Sampling is seeded by (seed, index)."""

  def __init__(self, folder: str, *, seed: int = 0, temperature: float = 0.7,
               max_new_tokens: int = 96, tries: int = 1):
    try:
      import torch
      import transformers
    except ImportError as e:  # pragma: no cover - depends on the installation
      raise ImportError("the language-model generator needs torch and transformers: "
                        'pip install -e ".[lm]"') from e
    self.torch = torch
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True).eval()
    self.name = f"lm:{folder}"
    self.seed, self.temperature = seed, temperature
    self.max_new_tokens, self.tries = max_new_tokens, tries

  def complete(self, caption: str, index: int, attempt: int = 0) -> str:
    """One sampled continuation of :func:`lm_prompt` (the new text only)."""
    torch = self.torch
    ids = self.tokenizer(lm_prompt(caption), return_tensors="pt").input_ids
    generator_seed = int(_rng(self.seed, index).integers(2 ** 31)) + attempt
    torch.manual_seed(generator_seed)
    pad = self.tokenizer.pad_token_id
    if pad is None:
      pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
    with torch.no_grad():
      out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=self.temperature, top_k=0, top_p=1.0,
                                max_new_tokens=self.max_new_tokens, pad_token_id=pad)
    return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

  def __call__(self, caption: str, index: int) -> Proposal:
    result = None
    for attempt in range(self.tries):
      result = parse_completion(caption, self.complete(caption, index, attempt))
      if result.rejected is None:
        break
    return result


def make_generator(spec: str, seed: int = 0, **kwargs):
  """``"builtin"`` or ``"lm:FOLDER"`` -> a generator (``ip2p synth --generator``)."""
  if spec == "builtin":
    return BuiltinGenerator(seed)
  if spec.startswith("lm:") and len(spec) > 3:
    return LanguageModelGenerator(spec[3:], seed=seed, **kwargs)
  raise ValueError(f"--generator must be 'builtin' or 'lm:FOLDER', got {spec!r}")
