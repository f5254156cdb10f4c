"""A round's segmentation: the refined network's labels where the new marks asked for a change, where
the refined network is sure, and where the image says so, except where the network itself was sure.

Refining a network on a few marked pixels moves its decision everywhere: besides the region the user
corrected, hundreds of small regions far from any mark can flip. Where the network was good, most of
those flips are wrong; where its error was systematic (a shifted intensity, a class it under-segments
everywhere), many are the very correction the user would draw next. On the correction benchmark's
cases (``docs/correction.md``, ``benchmarks/results/correction_cpu/changes.md``) two things told them
apart: how sure the *refined* network is of its new label (on the tissue cases, sure changes were
mostly right and unsure ones mostly wrong, near the marks as well as far from them; on the nuclei
cases hardly any change away from the marks was right, and the refined network was rarely sure of
one), and how sure the network W was of its old label (flipping pixels W gave 0.999 or more was mostly
wrong). So a round keeps the previous segmentation except

* in the connected regions of change that touch one of this round's new marks, where it takes the
  refined labels the refined network gives at least ``near`` probability: the progressive merge of
  FocalClick (Chen et al., "FocalClick: Towards Practical Interactive Image Segmentation", CVPR 2022),
  which updates only the regions that contain the new clicks, without the weak fringe a refinement
  grows around a click;
* wherever the refined network gives its new label at least ``far`` probability (``free``; also, if
  asked, where W was unsure);
* then, given the image, in each connected region where that result and the refined labels still
  differ and whose intensity resembles its neighbours of the refined class more than its neighbours
  of the class it has, by a ``contrast`` score (:func:`contrast_scores`): a region drift flipped looks
  like the pixels around it that kept its class, while a systematic error the refinement fixed looks
  like the pixels of the class it learnt (how its threshold was chosen:
  ``benchmarks/results/correction_cpu/contrast.md``; the sureness signals tried before it:
  ``docs/correction.md``, "Tried for the merge and not adopted");

and never on a ``protected`` pixel (W was sure of it), unless the change is into or out of a class W
never learnt (one appended to its head, :func:`scribblejax.models.surgery.add_classes`): W's sureness
says nothing against a class it could not predict. Every marked pixel then takes its mark: what the user drew holds
in the segmentation whether or not the network's argmax honours it (the round's report says which).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from scipy import ndimage

REASONS = ("kept", "mark", "new_marks", "sure", "image")
"""Why a pixel of a round's merge has its label, by code (:class:`Merged`'s ``reasons``): ``kept`` the previous
segmentation's (unchanged, or kept by the protection); ``mark`` a mark's; ``new_marks`` the refined label, changed
in a region of change touching a new mark (where ``near``); ``sure`` the refined label, changed where ``free`` (the
refined network is sure of it, or, with ``RefineConfig.merge_confidence``, W was unsure); ``image`` the refined
label, changed in a region whose intensity resembles its new class (the contrast step). Only a marked pixel may
keep its label under another reason than ``kept``."""


class Merged(NamedTuple):
  """A round's merge (:func:`merge_with_reasons`)."""

  labels: np.ndarray  # int32[*spatial]
  reasons: np.ndarray  # uint8[*spatial]: why each pixel has its label, an index into REASONS


def progressive_merge(
  previous: Any,
  proposed: Any,
  new_marks: Any,
  marks: Any | None = None,
  *,
  free: Any | None = None,
  near: Any | None = None,
  protected: Any | None = None,
  new_classes: tuple[int, ...] = (),
  image: Any | None = None,
  contrast: float = 1.0,
) -> np.ndarray:
  """The round's labels: ``proposed`` in the changed regions that touch a new mark, ``previous`` elsewhere.

  Args:
    previous: ``int[*spatial]``, the segmentation before this round.
    proposed: ``int[*spatial]``, the refined network's labels.
    new_marks: ``int[*spatial]``, this round's marks (-1 unmarked).
    marks: ``int[*spatial]``, every mark so far (``None``: ``new_marks``); each marked pixel takes its mark.
    free: ``bool[*spatial]``, pixels that take ``proposed`` wherever they lie (the refined network's sure
      pixels, :func:`sure`, and where the network was unsure, :func:`unsure`).
    near: ``bool[*spatial]``, the pixels of a region of change touching a new mark that take ``proposed``
      (``None``: every pixel of such a region).
    protected: ``bool[*spatial]``, pixels that keep ``previous`` unless marked (where the network was
      sure, :func:`sure`), except where ``proposed`` or ``previous`` is one of ``new_classes``.
    new_classes: the classes the network W never learnt (appended to its head): a change into or out
      of one is not protected.
    image: ``float[*spatial, C]``, the image as the network reads it: with it, each region where the
      result still differs from ``proposed`` takes ``proposed`` when :func:`resembling` scores it above
      ``contrast``, on its pixels that are neither marked nor ``protected`` (``None``: none does).
    contrast: the score in ``[-1, 1]`` a region must pass (1: none does).

  Returns:
    ``int32[*spatial]`` (with why each pixel has its label: :func:`merge_with_reasons`).

  Raises:
    ValueError: the maps differ in shape.
  """
  return merge_with_reasons(
    previous,
    proposed,
    new_marks,
    marks,
    free=free,
    near=near,
    protected=protected,
    new_classes=new_classes,
    image=image,
    contrast=contrast,
  ).labels


def merge_with_reasons(
  previous: Any,
  proposed: Any,
  new_marks: Any,
  marks: Any | None = None,
  *,
  free: Any | None = None,
  near: Any | None = None,
  protected: Any | None = None,
  new_classes: tuple[int, ...] = (),
  image: Any | None = None,
  contrast: float = 1.0,
) -> Merged:
  """:func:`progressive_merge`, with why each pixel has its label (:data:`REASONS`): what a round's report
  counts, so that a person sees how much of a change their new marks asked for and how much the refined
  network's sureness or the image brought. Arguments as :func:`progressive_merge`'s.

  A pixel the new-mark rule takes (in a region of change touching a new mark, and ``near``) is ``new_marks``
  even where it is ``free`` too.

  Raises:
    ValueError: the maps differ in shape.
  """
  previous, proposed, new_marks = np.asarray(previous), np.asarray(proposed), np.asarray(new_marks)
  marks = new_marks if marks is None else np.asarray(marks)
  shapes = {previous.shape, proposed.shape, new_marks.shape, marks.shape}
  if len(shapes) != 1:
    raise ValueError(f"progressive_merge needs label maps of one shape, got {sorted(shapes)}")
  changed = proposed != previous
  regions, _ = ndimage.label(changed)
  asked = np.unique(regions[(new_marks >= 0) & changed])
  touching = np.isin(regions, asked[asked > 0])
  if near is not None:
    touching &= _mask("near", near, previous.shape)
  free = np.zeros(previous.shape, bool) if free is None else _mask("free", free, previous.shape)
  kept = np.zeros(previous.shape, bool)
  if protected is not None:
    kept = kept_by_protection(_mask("protected", protected, previous.shape), previous, proposed, new_classes)
  codes = [REASONS.index(reason) for reason in ("mark", "new_marks", "sure")]
  reasons = np.select([marks >= 0, touching & ~kept, free & changed & ~kept], codes, 0).astype(np.uint8)
  merged = np.where(marks >= 0, marks, np.where(reasons > 0, proposed, previous))
  if image is not None and contrast < 1:
    alike = resembling(image, merged, proposed, contrast) & ~kept & (marks < 0)
    merged = np.where(alike, proposed, merged)
    reasons = np.where(alike, np.uint8(REASONS.index("image")), reasons)
  return Merged(merged.astype(np.int32), reasons)


def changed_by(merged: Merged, previous: Any) -> dict[str, int]:
  """The pixels whose label a round's merge changed from ``previous``, per reason (:data:`REASONS` but
  ``kept``, which changes none)."""
  changed = merged.labels != np.asarray(previous)
  counts = np.bincount(merged.reasons[changed], minlength=len(REASONS))
  return {reason: int(n) for reason, n in zip(REASONS[1:], counts[1:], strict=True)}


def kept_by_protection(protected: Any, previous: Any, proposed: Any, new_classes: tuple[int, ...] = ()) -> np.ndarray:
  """The ``protected`` pixels (the network W was sure of them) that a round may not change: all but those
  whose change is into or out of one of ``new_classes``, which W never learnt (its sureness says nothing
  against them)."""
  appended = np.isin(proposed, new_classes) | np.isin(previous, new_classes)
  return np.asarray(protected, bool) & ~appended


RING = 4  # pixels: how far around a region of difference :func:`resembling` reads its neighbours
LEAST_NEIGHBOURS = 3  # neighbours of each class a region needs for :func:`resembling` to judge it


def resembling(image: Any, shown: Any, other: Any, at_least: float, ring: int = RING) -> np.ndarray:
  """The pixels of each connected region where ``shown`` and ``other`` differ whose intensity resembles
  its neighbours of ``other``'s class more than its neighbours of ``shown``'s, by a score above ``at_least``
  (:func:`contrast_scores`).

  Args:
    image: ``float[*spatial, C]`` (or ``float[*spatial]``, one channel).
    shown: ``int[*spatial]``, the segmentation shown.
    other: ``int[*spatial]``, the segmentation whose regions may be taken.
    at_least: the score a region must exceed (1 or more: none does).
    ring: how far around a region its neighbours lie, in pixels (at least 1).

  Returns:
    ``bool[*spatial]``: the pixels of the regions that pass.

  Raises:
    ValueError: the shapes differ, or ``ring`` is below 1.
  """
  regions, scores = contrast_scores(image, shown, other, ring)
  with np.errstate(invalid="ignore"):
    passed = scores > at_least  # NaN (not judged) never passes
  return passed[regions]


def contrast_scores(image: Any, shown: Any, other: Any, ring: int = RING) -> tuple[np.ndarray, np.ndarray]:
  """The connected regions where ``shown`` and ``other`` differ, and how much each looks like ``other``'s class.

  For a region, with ``a`` the class most of its pixels have in ``shown`` and ``b`` in ``other``: ``m`` is its mean
  intensity, and ``m_a``, ``m_b`` the mean intensities of its neighbours (the pixels within ``ring`` pixels of it
  along every axis that lie in no region of difference and whose intensity is finite) that ``shown`` labels ``a`` and
  ``b``. Its score is ``(|m - m_a| - |m - m_b|) / |m_a - m_b|`` (Euclidean over channels), which lies in ``[-1, 1]``:
  1 where the region looks exactly like its neighbours of class ``b``, -1 like those of class ``a``, 0 halfway. A
  region drift flipped looks like the pixels around it that kept its class; a systematic error the refinement fixed
  looks like the pixels of the class it learnt. A region with fewer than :data:`LEAST_NEIGHBOURS` neighbours of either
  class, whose two classes are one, or whose two neighbourhoods look the same, is not judged.

  Args:
    image: ``float[*spatial, C]`` (or ``float[*spatial]``, one channel).
    shown: ``int[*spatial]``, the segmentation shown.
    other: ``int[*spatial]``, the other segmentation.
    ring: how far around a region its neighbours lie, in pixels (at least 1).

  Returns:
    ``(regions, scores)``: ``int32[*spatial]``, the regions numbered from 1 (0 where the two agree), and
    ``float64[count + 1]``, each region's score (NaN where not judged, and at 0).

  Raises:
    ValueError: the shapes differ, or ``ring`` is below 1.
  """
  shown, other, image = np.asarray(shown), np.asarray(other), np.asarray(image, np.float64)
  image = image[..., None] if image.shape == shown.shape else image  # one channel, without its axis
  if shown.shape != other.shape or image.shape[:-1] != shown.shape:
    raise ValueError(
      f"contrast_scores needs an image [*spatial, C] and label maps of its spatial shape, got {image.shape}, "
      f"{shown.shape} and {other.shape}"
    )
  if ring < 1:
    raise ValueError(f"ring is a distance in pixels, at least 1, got {ring}")
  regions, count = ndimage.label(shown != other)
  scores = np.full(count + 1, np.nan)
  for index, box in enumerate(ndimage.find_objects(regions), start=1):
    scores[index] = _score(image, shown, other, regions, index, box, ring)
  return regions, scores


def _score(image, shown, other, regions, index: int, box: tuple[slice, ...], ring: int) -> float:
  """:func:`contrast_scores`' score of region ``index`` (its bounding ``box``); NaN where not judged."""
  crop = tuple(slice(max(s.start - ring, 0), s.stop + ring) for s in box)
  labels, pixels = regions[crop], image[crop]
  inside = labels == index
  around = ndimage.maximum_filter(inside, size=2 * ring + 1) & (labels == 0) & np.isfinite(pixels).all(axis=-1)
  a = np.bincount(shown[crop][inside]).argmax()
  b = np.bincount(other[crop][inside]).argmax()
  near_a, near_b = around & (shown[crop] == a), around & (shown[crop] == b)
  if a == b or near_a.sum() < LEAST_NEIGHBOURS or near_b.sum() < LEAST_NEIGHBOURS:
    return np.nan
  mean, mean_a, mean_b = pixels[inside].mean(0), pixels[near_a].mean(0), pixels[near_b].mean(0)
  spread = float(np.linalg.norm(mean_a - mean_b))
  if spread == 0:
    return np.nan
  return float((np.linalg.norm(mean - mean_a) - np.linalg.norm(mean - mean_b)) / spread)


def _mask(name: str, mask: Any, shape: tuple[int, ...]) -> np.ndarray:
  mask = np.asarray(mask, bool)
  if mask.shape != shape:
    raise ValueError(f"{name} pixels of shape {mask.shape} and labels of shape {shape} differ")
  return mask


def sure(probabilities: Any, confidence: float) -> np.ndarray:
  """Pixels whose top class probability is at least ``confidence``: where a network is sure.

  Args:
    probabilities: ``float[*spatial, classes]`` (a softmax).
    confidence: in ``[0, 1]``; 0 marks every pixel, 1 none (a saturated float32 softmax can reach 1).
  """
  top = np.asarray(probabilities).max(axis=-1)
  return top >= confidence if confidence < 1 else np.zeros(top.shape, bool)


def merge_masks(
  refined_output: Any, initial_logits: Any | None, config: Any
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
  """The ``(free, near, protected)`` masks of :func:`progressive_merge` for a round with ``config``'s thresholds:
  the one place the thresholds become masks, for a session, the harness and the pipeline's round alike.

  Args:
    refined_output: ``float[*spatial, classes]``, the refined network's scores as a refinement returns
      them: logits, or a softmax with ``config.output == "probabilities"`` (``None``: no near or far
      masks; the regions of change touching a new mark are taken whole).
    initial_logits: the network's (W) logits, for ``config.merge_protect`` and ``config.merge_confidence``
      (``None``: neither).
    config: a :class:`scribblejax.RefineConfig` (``output``, ``merge_near``, ``merge_far``,
      ``merge_protect``, ``merge_confidence``).
  """
  free = near = protected = None
  if refined_output is not None:
    refined = refined_output if config.output == "probabilities" else jax.nn.softmax(refined_output, axis=-1)
    near = sure(refined, config.merge_near)
    free = sure(refined, config.merge_far)
  if initial_logits is not None:
    initial = jax.nn.softmax(initial_logits, axis=-1)
    protected = sure(initial, config.merge_protect)
    if config.merge_confidence > 0:
      unsure_w = unsure(initial, config.merge_confidence)
      free = unsure_w if free is None else free | unsure_w
  return free, near, protected


def merge_round(
  previous: Any,
  proposed: Any,
  new_marks: Any,
  marks: Any,
  config: Any,
  refined_output: Any | None,
  initial_logits: Any | None,
  new_classes: tuple[int, ...] = (),
  image: Any | None = None,
) -> Merged:
  """A round's labels on the grid the network ran on, with why each pixel has its label: :func:`merge_masks`
  with ``config``'s thresholds, then :func:`merge_with_reasons` (as a session and the harness run it; the
  pipeline brings the masks to the image's grid first, :func:`scribblejax.pipeline.round.round_labels`).

  Args:
    previous, proposed, new_marks, marks: as :func:`progressive_merge`'s.
    config: a :class:`scribblejax.RefineConfig` (the merge's thresholds).
    refined_output: the refined network's scores (``None``: a region-based network, whose sigmoids are
      no distribution over classes; with ``initial_logits`` ``None`` too, the regions of change touching
      a new mark are taken whole).
    initial_logits: the network's (W) logits (``None``: nothing is protected or freed).
    new_classes: classes appended to the network's head (:func:`progressive_merge`).
    image: ``float[*spatial, C]``, the image, for ``config.merge_contrast`` (``None``, or a region-based
      network: no region is taken by it).
  """
  free, near, protected = merge_masks(refined_output, initial_logits, config)
  return merge_with_reasons(
    previous,
    proposed,
    new_marks,
    marks,
    free=free,
    near=near,
    protected=protected,
    new_classes=new_classes,
    image=None if refined_output is None else image,
    contrast=config.merge_contrast,
  )


def unsure(probabilities: Any, confidence: float) -> np.ndarray:
  """Pixels whose top class probability is below ``confidence``: where the network was unsure.

  With ``RefineConfig.merge_confidence`` above 0 a round lets the refined network relabel the pixels
  where the network (W) was unsure anywhere (``free=`` of :func:`progressive_merge`).

  Args:
    probabilities: ``float[*spatial, classes]`` (a softmax).
    confidence: in ``[0, 1]``; 0 frees no pixel, 1 every pixel.
  """
  return np.asarray(probabilities).max(axis=-1) < confidence


def new_marks_of(marks: Any, earlier: Any | None) -> np.ndarray:
  """The marks of ``marks`` that ``earlier`` (the marks before this round, or ``None``) did not hold."""
  marks = np.asarray(marks)
  if earlier is None:
    return marks.astype(np.int32)
  return np.where(np.asarray(earlier) == marks, -1, marks).astype(np.int32)


def take_where(shown: Any, other: Any, where: Any) -> np.ndarray:
  """``shown`` with ``other``'s labels in each connected region where the two differ that ``where`` touches.

  A round with the merge offers two segmentations, its merge and the refined network's own labels
  (:func:`scribblejax.session.take`). Where a network is wrong the same way all over, its own labels can be
  the better correction in one region and wrong in another; this takes them region by region: a person
  points at a region (a click, a short stroke) and the whole connected region of difference is taken.

  Args:
    shown: ``int[*spatial]``, the segmentation shown.
    other: ``int[*spatial]``, the segmentation to take from.
    where: ``bool[*spatial]``, the pixels pointed at.

  Returns:
    ``int32[*spatial]``.

  Raises:
    ValueError: the maps differ in shape, ``where`` is not a boolean mask of their shape, the two are the
      same, or ``where`` touches no pixel where they differ.
  """
  shown, other = np.asarray(shown), np.asarray(other)
  if shown.shape != other.shape:
    raise ValueError(f"take_where needs label maps of one shape, got {shown.shape} and {other.shape}")
  if np.asarray(where).dtype != bool:
    raise ValueError(f"where is a boolean mask (True where pointed at), got dtype {np.asarray(where).dtype}")
  where = _mask("where", where, shown.shape)
  if np.array_equal(shown, other):
    raise ValueError("the segmentation shown is already the one to take, everywhere: nothing to take")
  regions, _ = ndimage.label(shown != other)
  touched = np.unique(regions[where])
  touched = touched[touched > 0]
  if not touched.size:
    raise ValueError(
      f"the {int(where.sum())} pixels pointed at touch no region where the two segmentations differ: nothing to take"
    )
  return np.where(np.isin(regions, touched), other, shown).astype(np.int32)


class Difference(NamedTuple):
  """One connected region where two segmentations differ (:func:`differences`)."""

  size: int  # its pixels
  point: tuple[int, ...]  # an index inside it, as far from its edge as any: where to point at it
  shown: int  # the class most of its pixels have in the segmentation shown (a tie: the lowest such class)
  other: int  # the class most of its pixels have in the other (a tie: the lowest such class)


def differences(shown: Any, other: Any, limit: int | None = None) -> tuple[Difference, ...]:
  """The connected regions where ``shown`` and ``other`` differ, largest first: what to look at before
  taking ``other`` region by region (:func:`take_where`).

  After a round with the merge its two segmentations can differ in hundreds of regions, most of them a
  pixel or two wide; a person looks at the largest few and takes the ones where ``other`` is right. Each
  region comes with a point inside it (the pixel farthest from its edge), so pointing there with
  :func:`take_where` takes that region and no other. Regions of one size keep the order of their first
  pixel in C order.

  Args:
    shown: ``int[*spatial]``, the segmentation shown.
    other: ``int[*spatial]``, the segmentation to take from.
    limit: the most regions to return (``None``: all).

  Returns:
    The regions, largest first; empty where the two are the same.

  Raises:
    ValueError: the maps differ in shape, or ``limit`` is negative.
  """
  shown, other = np.asarray(shown), np.asarray(other)
  if shown.shape != other.shape:
    raise ValueError(f"differences needs label maps of one shape, got {shown.shape} and {other.shape}")
  if limit is not None and limit < 0:
    raise ValueError(f"limit is the most regions to return, a count, got {limit}")
  regions, count = ndimage.label(shown != other)
  if not count:
    return ()
  sizes = np.bincount(regions.ravel())[1:]
  order = np.argsort(-sizes, kind="stable")[:limit]
  boxes = ndimage.find_objects(regions)
  return tuple(_difference(regions, int(i) + 1, boxes[i], shown, other) for i in order)


def _difference(regions: np.ndarray, index: int, box: tuple[slice, ...], shown: np.ndarray, other: np.ndarray):
  """Region ``index`` of ``regions`` (its bounding ``box``) as a :class:`Difference`."""
  inside = regions[box] == index
  depth = ndimage.distance_transform_edt(np.pad(inside, 1))[(slice(1, -1),) * inside.ndim]
  deepest = np.unravel_index(int(np.argmax(depth)), inside.shape)
  point = tuple(int(s.start + d) for s, d in zip(box, deepest, strict=True))
  return Difference(
    size=int(inside.sum()),
    point=point,
    shown=int(np.bincount(shown[box][inside]).argmax()),
    other=int(np.bincount(other[box][inside]).argmax()),
  )
