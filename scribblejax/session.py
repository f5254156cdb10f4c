"""Interaction sessions, as pure values: start from the network's prediction, add marks, refine, read
the result, take a round's merge or the refined network's own labels, undo a round.

Each round accumulates the new marks over the earlier ones and refines. By default every round
restarts from the original weights W (the paper's reset); ``continue_weights=True`` starts each
round from the previous round's W_lam instead (the proximal term still pulls towards W).

Example:
  >>> s = start_session(split, image)
  >>> s = add_marks(s, encode_marks(image.shape[:2], [Scribble([(5, 5), (5, 40)], label=1)]))
  >>> s = add_marks(s, more_marks)
  >>> s = undo(s)                      # back to the first round
  >>> s = take(s, "network")           # the refined network's own labels instead of the round's merge
  >>> s = take(s, "merged", where=m)   # the merge again in the regions the mask m points at
  >>> differences(s)[:3]               # the three largest regions where the network's own labels differ
  >>> current_labels(s)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scribblejax import marks as marks_lib
from scribblejax.config import RefineConfig
from scribblejax.params import Split
from scribblejax.refinement import RefineResult, Trunk, compute_trunk, predict, refine, trunk_mismatch
from scribblejax.refinement.merge import Difference, merge_round, new_marks_of, take_where
from scribblejax.refinement.merge import differences as differences_of

TAKES = ("merged", "network")  # a round's two segmentations, as take and differences name them


class Round(NamedTuple):
  """One interaction round."""

  marks: np.ndarray  # int32[*spatial]: all marks so far (accumulated), -1 unmarked; read-only
  result: RefineResult  # the refinement this round produced
  labels: Any = None  # int32[*spatial]: the round's merged segmentation (None: no merge, result.labels); see
  # RefineConfig.progressive_merge
  taken: str = "merged"  # what the round shows: its merge, labels ("merged"), result.labels ("network"), or
  # the merge with the refined network's own labels in some regions ("mixed", shown; see take)
  shown: Any = None  # int32[*spatial]: the segmentation shown when taken is "mixed" (else None); read-only
  reasons: Any = None  # uint8[*spatial]: why each pixel of labels has its label, an index into
  # scribblejax.refinement.merge.REASONS (None: no merge); read-only


class Session(NamedTuple):
  """An interaction session; every operation returns a new session."""

  split: Split  # the network, with the original tunable weights W
  image: np.ndarray  # a read-only copy of the image as given
  initial_logits: jax.Array  # f32[*spatial, classes]: the network's own prediction
  rounds: tuple[Round, ...]  # completed rounds, oldest first
  config: RefineConfig
  continue_weights: bool  # start each round from the previous W_lam instead of W
  trunk: Trunk | None = None  # the frozen trunk's values for this image, computed once for all rounds
  new_classes: tuple[int, ...] = ()  # classes appended to the network's head: the merge does not protect against them


def start_session(
  split: Split,
  image: Any,
  config: RefineConfig = RefineConfig(),
  *,
  continue_weights: bool = False,
  new_classes: Sequence[int] = (),
) -> Session:
  """Starts a session on one image with the network's own prediction.

  With ``config.cache_trunk`` (the default) the frozen trunk is computed here, once
  (:func:`scribblejax.compute_trunk`), and every round reuses it; the session holds its values in
  device memory. The session keeps a read-only copy of ``image``: later changes to the caller's array
  do not reach it.

  Args:
    split: the network, split into its tunable tail and frozen rest.
    image: ``float[*spatial, channels]``.
    config: the rounds' settings (each round may pass its own).
    continue_weights: start each round from the previous round's weights instead of W.
    new_classes: the classes appended to the network's head (:func:`scribblejax.models.surgery.add_classes`)
      that it never learnt, e.g. ``(2,)`` after appending one class to a two-class network: the round's
      merge lets the refined network relabel pixels the network was sure of into these
      (:func:`scribblejax.refinement.merge.progressive_merge`).

  Raises:
    ValueError: a class of ``new_classes`` that the network does not output.
  """
  image = _frozen(np.array(image))
  trunk = compute_trunk(split, image, config) if config.cache_trunk else None
  logits = predict(split, image, trunk=trunk)
  new_classes = tuple(int(c) for c in new_classes)
  outside = [c for c in new_classes if not 0 <= c < logits.shape[-1]]
  if outside:
    raise ValueError(f"new_classes {outside} are not classes of the network, which outputs {logits.shape[-1]}")
  return Session(split, image, logits, (), config, continue_weights, trunk, new_classes)


def _regions(split: Split) -> bool:
  """Whether the network is region-based (sigmoid scores: no distribution over classes)."""
  from flax import nnx

  from scribblejax.models.regions import Regions

  return isinstance(nnx.merge(split.graphdef, split.tunable, split.frozen), Regions)


def _frozen(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)
  return array


def current_marks(session: Session) -> np.ndarray:
  """All marks so far (``-1`` everywhere before the first round), as a new array the caller may edit."""
  if session.rounds:
    return session.rounds[-1].marks.copy()
  return np.full(session.initial_logits.shape[:-1], marks_lib.UNMARKED, np.int32)


def current_logits(session: Session) -> jax.Array:
  """Logits of the latest round, or the network's own before any round."""
  return session.rounds[-1].result.logits if session.rounds else session.initial_logits


def current_labels(session: Session) -> jax.Array:
  """The current segmentation, ``int32[*spatial]``: the latest round's merge or the refined network's own
  labels, whichever it shows (:func:`take`), or the network's own before any round."""
  if session.rounds:
    last = session.rounds[-1]
    return _shown(last)
  return jnp.argmax(session.initial_logits, axis=-1).astype(jnp.int32)


def _shown(round_: Round) -> Any:
  """The segmentation a round shows (:attr:`Round.taken`)."""
  return _segmentation(round_, round_.taken)


def _segmentation(round_: Round, name: str) -> Any:
  """A round's segmentation called ``name``: its merge, the refined network's own labels, or the mix shown."""
  return {"merged": round_.labels, "network": round_.result.labels, "mixed": round_.shown}[name]


def add_marks(session: Session, new_marks: Any, config: RefineConfig | None = None) -> Session:
  """Adds a round: accumulates ``new_marks`` (int map, -1 unmarked) and refines.

  With ``config.progressive_merge`` (the default) the round's segmentation is the refined labels in
  the regions of change that touch the new marks (where the refined network is sure of them) and
  wherever the refined network is very sure, except where the network was very sure; the previous
  segmentation elsewhere, and every mark on its pixels (:func:`scribblejax.refinement.merge.progressive_merge`);
  ``current_logits`` stays the refined network's.

  Args:
    session: the session so far.
    new_marks: this round's marks, ``int[*spatial]``; they override earlier marks where they overlap.
    config: settings for this round (defaults to the session's).

  Returns:
    A new session with one more round.
  """
  marks = _frozen(marks_lib.accumulate(current_marks(session), new_marks))
  config = session.config if config is None else config
  start = session.rounds[-1].result.tunable if (session.continue_weights and session.rounds) else None
  trunk = session.trunk
  if trunk is not None and trunk_mismatch(trunk, session.split, config) is not None:
    trunk = None  # a round whose config computes differently computes its own trunk
  result = refine(session.split, session.image, marks, config, start=start, trunk=trunk)
  labels = reasons = None
  if config.progressive_merge:
    new = new_marks_of(marks, current_marks(session) if session.rounds else None)
    scores = (None, None) if _regions(session.split) else (result.logits, session.initial_logits)
    previous = np.asarray(current_labels(session))
    merged = merge_round(
      previous, np.asarray(result.labels), new, marks, config, *scores, session.new_classes, image=session.image
    )
    labels, reasons = _frozen(merged.labels), _frozen(merged.reasons)
  round_ = Round(marks, result, labels, "merged" if labels is not None else "network", reasons=reasons)
  return session._replace(rounds=session.rounds + (round_,))


def undo(session: Session) -> Session:
  """Drops the latest round (marks and result). ``ValueError`` when there is none."""
  if not session.rounds:
    raise ValueError("nothing to undo: the session has no rounds")
  return session._replace(rounds=session.rounds[:-1])


def differences(session: Session, which: str = "network", limit: int | None = None) -> tuple[Difference, ...]:
  """The connected regions where the latest round's segmentation shown and ``which`` differ, largest first.

  What a person looks at before taking ``which`` region by region: each region's size, the classes on
  either side, and a point inside it; a mask holding that point, given to :func:`take` as ``where``,
  takes that region (:func:`scribblejax.refinement.merge.differences`).

  Args:
    session: the session so far.
    which: ``"network"`` (the refined network's own labels) or ``"merged"`` (the round's merge).
    limit: the most regions to return (``None``: all).

  Raises:
    ValueError: no round, ``which`` is neither name, or the latest round was refined without the merge
      (it has one segmentation).
  """
  last = _mixable(_latest(session, which, "no round yet: the session has no two segmentations to compare"))
  return differences_of(np.asarray(_shown(last)), np.asarray(_segmentation(last, which)), limit)


def _latest(session: Session, which: str, no_round: str) -> Round:
  """The latest round, once ``which`` is known to name one of its two segmentations; ``ValueError`` with
  ``no_round`` when there is none."""
  if which not in TAKES:
    raise ValueError(f"a round's segmentation is one of {', '.join(TAKES)}, got {which!r}")
  if not session.rounds:
    raise ValueError(no_round)
  return session.rounds[-1]


def _mixable(round_: Round) -> Round:
  """``round_``, which offers both segmentations; ``ValueError`` when it was refined without the merge."""
  if round_.labels is None:
    raise ValueError("the latest round was refined without the merge: it has one segmentation, none to mix with")
  return round_


def take(session: Session, which: str, where: Any = None) -> Session:
  """Makes the latest round show its merge (``"merged"``) or the refined network's own labels
  (``"network"``), whole or in the regions ``where`` points at; the next round's merge starts from the
  one shown.

  With the progressive merge a round keeps the previous segmentation except where its marks asked for a
  change and where the refined network is very sure. Where the network's error was the same all over,
  the refined network's own labels (``rounds[-1].result.labels``) can be the better segmentation; this
  chooses between the two, as ``scribblejax refine --take`` does for a session folder. With ``where`` it
  chooses region by region (:func:`scribblejax.refinement.merge.take_where`): the connected regions
  where the segmentation shown and ``which`` differ that ``where`` touches take ``which``; the rest
  stays as shown (``refine --take network --where FILE``).

  Args:
    session: the session so far.
    which: ``"merged"`` or ``"network"``.
    where: ``bool[*spatial]``, pixels pointing at the regions to take (``None``: the whole segmentation).

  Returns:
    The session with its latest round showing ``which`` (``Round.taken``), or a mix (``"mixed"``,
    ``Round.shown``).

  Raises:
    ValueError: no round, ``which`` is neither name, ``"merged"`` for a round refined without the merge,
      or ``where`` of another shape or touching no region where the two differ.
  """
  last = _latest(session, which, "nothing to take: the session has no rounds")
  if which == "merged" and last.labels is None:
    raise ValueError("the latest round was refined without the merge: there is no merge to take")
  if where is None:
    return session._replace(rounds=session.rounds[:-1] + (last._replace(taken=which, shown=None),))
  shown = take_where(np.asarray(_shown(_mixable(last))), np.asarray(_segmentation(last, which)), where)
  same = [name for name in TAKES if np.array_equal(shown, np.asarray(_segmentation(last, name)))]
  taken = last._replace(taken=same[0], shown=None) if same else last._replace(taken="mixed", shown=_frozen(shown))
  return session._replace(rounds=session.rounds[:-1] + (taken,))
