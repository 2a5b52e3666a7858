"""The pseudo-mask variants: one declarative record each, in the ``VARIANTS`` registry.

A variant says which CAMs go into the dense CRF, which CRF runs and how its posterior
becomes labels; ``masks/core.py`` implements every choice, for numpy and jax alike. The
built-in ones (the paper's Table 2 rows, then the rough masks of multi-crop training):

* ``"ppmg"``: CVS, one binary dense CRF per present class on ``[(1 - x_s) ** alpha, x_s]``,
  foreground where the posterior exceeds 0.5, PPMG on the UNSMOOTHED ``x`` (the paper);
* ``"baseline"``: one joint CRF over ``[background, present classes]``, argmax (paper 3.1);
* ``"crf_cvs"``: the baseline on CVS-smoothed CAMs; ``"ppmg_no_cvs"``: PPMG with ``x_s = x``;
* ``"rough"``: PMM's multi-crop rough masks (official ``infer_multi_scale.py --out_crf``):
  the CAMs as given, one joint CRF, alpha 24; a label where its posterior exceeds 0.9, 255
  elsewhere.

Another variant is one call from any module (named in ``config.plugins``, see
``pmm_jax/registry.py``)::

    VARIANTS.register("ppmg_raw", Variant(smoothing="raw", crf="binary", labels="ppmg"))

Imports only the standard library: the CPU workers receive the record itself (it pickles
as data), so they need not import the module that registered it.
"""

from __future__ import annotations

import dataclasses

from pmm_jax.registry import Registry

# Background exponent of the paper (pseudo-masks); a variant may declare its own.
PAPER_ALPHA = 11.0
SMOOTHINGS = ("none", "cvs", "raw")  # normalised; normalised then CVS; as given
CRF_KINDS = ("joint", "binary")  # one CRF over [background, classes]; one per class
LABEL_RULES = {"argmax": "joint", "confident": "joint", "ppmg": "binary"}  # rule: its CRF


@dataclasses.dataclass(frozen=True)
class Variant:
    """One pseudo-mask variant.

    Attributes:
        smoothing: the CAMs the CRF sees: ``"none"`` (min-max normalised), ``"cvs"``
            (normalised, then CVS) or ``"raw"`` (as given); label rules read the unsmoothed.
        crf: ``"joint"`` or ``"binary"`` (``CRF_KINDS``).
        labels: ``"argmax"`` (joint), ``"confident"`` (joint; rough masks: 255 where no
            posterior exceeds 0.9) or ``"ppmg"`` (binary).
        alpha: the background exponent when the config gives none.
    """

    smoothing: str
    crf: str
    labels: str
    alpha: float = PAPER_ALPHA

    def __post_init__(self):
        problems = [f"{field} {value!r} is not one of {allowed}" for field, value, allowed in (
            ("smoothing", self.smoothing, SMOOTHINGS), ("crf", self.crf, CRF_KINDS),
            ("labels", self.labels, tuple(LABEL_RULES))) if value not in allowed]
        if not problems and LABEL_RULES[self.labels] != self.crf:
            problems.append(f"labels {self.labels!r} needs crf={LABEL_RULES[self.labels]!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            problems.append(f"alpha {self.alpha!r} must be a positive number")
        if problems:
            raise ValueError(f"invalid pseudo-mask variant: {'; '.join(problems)}")


VARIANTS: Registry[Variant] = Registry("pseudo-mask variant")
VARIANTS.register("ppmg", Variant(smoothing="cvs", crf="binary", labels="ppmg"))
VARIANTS.register("baseline", Variant(smoothing="none", crf="joint", labels="argmax"))
VARIANTS.register("crf_cvs", Variant(smoothing="cvs", crf="joint", labels="argmax"))
VARIANTS.register("ppmg_no_cvs", Variant(smoothing="none", crf="binary", labels="ppmg"))
# The official crf_threshs default.
VARIANTS.register("rough", Variant(smoothing="raw", crf="joint", labels="confident", alpha=24.0))
