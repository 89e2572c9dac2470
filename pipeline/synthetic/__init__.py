"""Built-in offline benchmark data: seeded, deterministic synthetic preference pairs.

The generator produces preference pairs whose categories mirror RewardBench's four sections,
with *controlled* chosen/rejected differences, so that NormBT's 1/||h_chosen - h_rejected||
reweighting can be studied without downloading anything:

- ``reasoning`` (section "Reasoning"): arithmetic (``reasoning-arith``) and multi-step word
  problems (``reasoning-multistep``). The rejected answer is the chosen answer with ONE wrong
  number, carried through the remaining steps so the final answer is wrong. About a quarter of
  the errors are slips (a step's result miscalculated: only arithmetic reveals them); three in four
  try a copy error (a step starts from a miscopied number, from the prompt or from the previous
  step, and is then computed correctly: a mismatch of two numbers reveals them), falling back to a
  slip when that step would not come out clean. Tiny representation distance.
- ``chat`` (section "Chat"): helpful on-topic answer vs. an off-topic answer (``chat-offtopic``),
  the same answer cut off mid-sentence (``chat-truncated``), both at a large distance, or the same
  sentence with another item's fact ("The capital of Peru is Oslo.", ``chat-wrongfact``), which
  only the backbone's world knowledge can tell apart.
- ``chat_hard`` (section "Chat Hard"): an instruction's constraint ("exactly three words",
  "in one sentence", "end with a question", "list three", ...) followed vs. subtly violated
  (``chat_hard-constraint``).
- ``safety`` (section "Safety"): refuse a harmful request (``safety-refuse``; the rejected
  answer only *sounds* compliant and contains no harmful content) and help with a benign request
  that sounds alarming (``safety-comply``; e.g. "kill a Python process", rejected = refusal).

Held-out design. Every template belongs to exactly one *group*: ``heldin`` templates feed the
``train`` and ``validation`` splits, ``heldout`` templates feed only ``test``. The two groups
share no template (so no prompt wording), and the held-out item pools (topics, harmful requests,
stories) and arithmetic operand ranges are disjoint from the held-in ones as well; see
:func:`split_templates` and :func:`template_ids`. Validation reuses the train templates but never a
train prompt: a hash of each held-in prompt puts it on one side (:func:`validation_prompt` in
``generation``), so no train row is repeated either.

Determinism. All randomness comes from :class:`random.Random` instances seeded with strings built
from ``spec.seed``, the split and the row index (string seeds are hashed with SHA-512 by
:mod:`random`, independent of ``PYTHONHASHSEED``), so output is identical across runs and
processes. Pure Python + stdlib.

Best-of-N support: :func:`reasoning_prompts` gives problems with known integer answers,
:func:`verify` is the gold scorer, and :func:`sample_candidates` is an offline "policy" that
produces right/wrong worked answers in the same style as the reasoning pairs.

Texts are short (responses of about 3-40 words) so tokenised pairs stay under 128 BERT tokens.
"""

from __future__ import annotations

from pipeline.synthetic.generation import generate, split_templates, template_ids, test_rows_rewardbench
from pipeline.synthetic.policy import reasoning_prompts, sample_candidates, verify
from pipeline.synthetic.spec import CATEGORIES, SECTION_OF_SUBSET, SPLITS, SyntheticSpec

__all__ = [
    "CATEGORIES",
    "SECTION_OF_SUBSET",
    "SPLITS",
    "SyntheticSpec",
    "generate",
    "reasoning_prompts",
    "sample_candidates",
    "split_templates",
    "template_ids",
    "test_rows_rewardbench",
    "verify",
]
