"""Bring your own model: a user's Flax CNN (NNX or Linen, any input size) seen through mask
points (kernel masks) or nodes (position maps), so that the splitters and composition run on
it unchanged.

``adapt(model, variables=None, *, input_shape, ...)`` runs the model once on zeros and
records, in call order, every conv, normalisation (``BatchNorm``, ``GroupNorm``,
``LayerNorm``) and dense call of Linen or NNX (``models.intercept``). Each conv gets a *mask
point* of its output channels, placed where masking a channel equals dropping that kernel:

* after the normalisation that reads the conv's output directly (``norm(conv(x))``), else
  at the conv's output;
* before the activation: for ReLU-like activations (``f(0) = 0``, positively homogeneous)
  ``f(m * y) = m * f(y)`` for m in {0, 1}, so a binary mask gates the activated output.

``kind="kernel"`` (default): an ``AdaptedCNN`` with the zoo's interface for kernel masks
(``mask_points()``, ``topology``, ``__call__(x, masks)``, ``kernel_maps``): masks are
``{point: float [C]}``, a point name is the conv's path (``"Conv_0"``, ``"blocks/2/proj"``).
Convs whose outputs are added (a residual block's last conv and its shortcut, identity or
projected) share one mask point, as the zoo's ResCNN pairs do: ``ties="auto"`` discovers them
from the traced graph (``models.ties``), ``ties="none"`` gives every conv its own point (exact
for the masked forward too, but such modules cannot be sliced), or groups are declared.
Kernels are counted per gated conv as for the zoo. The zoo's own models adapt to the points
they declare (their ``ConvBN`` layers are intercepted like a user's convs).

``kind="node"``: the same places as *nodes* of concern identification, a ``[H, W, C]``
position map each (every conv output, after its normalisation: the paper's mapping, where a
residual sum's inputs are masked before the Add), with ``node_forward`` returning the input
of the final dense layer (which must produce the logits) and ``fc`` that layer. MC-BLN's
removed features are removed from the channeled head (no pooling is assumed); MC-BI, which
walks a known graph, is refused.

Physical extraction of modules (conv chains and tied residual graphs):
``modules.extract_adapted``. Saving and loading (the user's parameters, the definition a
model is rebuilt from): ``models.adapted_io``.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

from flax import nnx

from .adapted import AdaptedCNN, DenseHead, LinenDefinition
from .adapted_io import definition_of
from .adapter_checks import check_call, check_training_call, explain, failing_points
from .base import MaskPoint
from .intercept import AdapterError, LayerCall, discover
from .ties import relu_inputs

__all__ = ["adapt", "AdaptedCNN", "AdapterError", "LayerCall", "discover", "DenseHead", "LinenDefinition"]


# ------------------------------------------------------------------------------- adapt
def adapt(
    net,
    variables: Mapping | None = None,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    mask_points: Sequence[str] | None = None,
    ties: Sequence[Sequence[str]] | str = "auto",
    apply_kwargs: Mapping | None = None,
    train_kwargs: Mapping | None = None,
    name: str | None = None,
    kind: Literal["kernel", "node"] = "kernel",
    definition: str | None = None,
    require_relu: bool = True,
    placements: Mapping[str, str] | None = None,
    verify: bool = True,
) -> AdaptedCNN:
    """Adapt a trained Flax CNN for the kernel-mask splitters and composition.

    Args:
      net: an ``nnx.Module`` called as ``net(x, **apply_kwargs)`` (put it in eval mode, e.g.
        ``net.eval()``), or a Linen module applied as ``net.apply(variables, x, **apply_kwargs)``
        (e.g. ``apply_kwargs={"train": False}``).
      variables: the Linen module's variables (``{"params": ..., "batch_stats": ...}``).
      train_kwargs: Linen only: the call arguments of the training forward (``{"train": True}``),
        which ``model(x, train=True)`` applies with ``mutable=["batch_stats"]`` and the dropout
        key; needed to train a Linen model with BatchNorm (``adapter_checks.check_training_call``).
      input_shape: (H, W, C) of one normalised image.
      num_classes: checked against the logits' width (read from it when None).
      mask_points: conv paths that get a mask point (default: every conv discovered).
      ties: ``"auto"`` (default): convs whose outputs are combined channel by channel (a
        residual sum: a block's last conv and its shortcut) share one mask point, found in the
        traced graph (``models.ties``); ``"none"``: every conv its own point; or explicit groups
        of conv paths, each named after its first conv called. Nodes are never tied.
      name: shown in ``arch`` (default: the class name).
      kind: ``"kernel"`` (GradSplitter, CNNSplitter) or ``"node"`` (concern identification:
        needs the logits to come from a final dense layer; no ties).
      definition: ``"package.module:name"``, a callable with no arguments returning the
        model's structure (``models.adapted_io``), which ``checkpoint.save_model`` records to
        load the model and its module sets again (found for a Linen class with default fields).
      require_relu: ``kind="node"``: refuse a model whose nodes are not ReLU inputs (concern
        identification reads a position as active when > 0); False adapts it anyway.
      placements: ``{conv: "norm" | "conv"}``: a conv's mask lies after the norm reading it
        (default) or at its output (where ``verify`` fails after the norm; ``AdaptedCNN.placements``).
      verify: check every mask point (``adapter_checks.failing_points``): masking a channel
        must equal the model with that kernel zeroed; where not after the norm, the point moves
        to the conv's output (ties traced again); where still not, ``AdapterError``.

    Raises:
      AdapterError: no conv layer, a declared path that is not a conv, tied convs of different
        widths, logits that are not [1, K] or disagree with ``num_classes``, a forward pass
        that fails on ``input_shape`` (the message says what to pass: eval mode, ``train``,
        the variables' collections, the input shape), variables of another model, a mask
        point that does not drop its kernel, bad ``train_kwargs``, or (``kind="node"``) nodes
        that are not ReLU inputs.
    """
    auto, ties = _check_arguments(net, variables, input_shape, kind, ties)
    definition = definition_of(net, definition)
    calls, out, final_dense, convs = _discover_calls(net, variables, input_shape, apply_kwargs, kind, num_classes)
    check_training_call(net, variables, input_shape, train_kwargs)
    chosen = list(convs) if mask_points is None else list(mask_points)
    unknown = [p for p in chosen + [q for g in ties for q in g] if p not in convs]
    if unknown:
        raise AdapterError(f"no conv layer at path(s) {unknown}; the convs found are {list(convs)}")

    def build(where: Mapping[str, str]) -> AdaptedCNN:
        make = lambda pts: AdaptedCNN(  # noqa: E731
            net, variables, input_shape=input_shape, num_classes=out[1], points=pts, calls=calls,
            apply_kwargs=apply_kwargs or {}, train_kwargs=train_kwargs, name=name or type(net).__name__, kind=kind,
            head=final_dense, definition=definition, placements=where)
        # every chosen conv its own point, then the points combined channel by channel share one
        found = make(_group(convs, chosen, ())).channel_graph(list(convs))[0] if auto else ties
        return make(_group(convs, chosen, found))

    model = build(placements or {})
    if kind == "kernel" and verify:
        model = _verified(model, build)
    if kind == "node" and require_relu:
        _require_relu_nodes(model)
    return model


def _check_arguments(net, variables, input_shape, kind: str, ties) -> tuple[bool, tuple]:
    """``adapt``'s argument checks; returns (trace ties automatically, explicit tie groups)."""
    if isinstance(net, nnx.Module) == (variables is not None):
        raise AdapterError("pass an NNX module alone, or a Linen module with its variables")
    if len(tuple(input_shape)) != 3:
        raise AdapterError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
    if kind not in ("kernel", "node"):
        raise AdapterError(f"kind must be 'kernel' or 'node', got {kind!r}")
    auto = isinstance(ties, str)
    if auto and ties not in ("auto", "none"):
        raise AdapterError(f"ties must be 'auto', 'none' or groups of conv paths, got {ties!r}")
    if kind == "node" and not auto and ties:
        raise AdapterError("ties gate kernels; position nodes (kind='node') are never tied")
    return auto and ties == "auto" and kind == "kernel", (() if auto else ties)


def _discover_calls(net, variables, input_shape, apply_kwargs, kind: str, num_classes):
    """(layer calls, logits shape, the final dense layer or None, ``{path: conv call}``) of one
    traced forward pass, each checked (``adapt``'s Raises)."""
    check_call(net, variables, input_shape, apply_kwargs)
    try:
        calls, out, final_dense = discover(net, variables, input_shape=input_shape, apply_kwargs=apply_kwargs)
    except AdapterError as e:
        raise AdapterError(explain(e.__cause__, input_shape) if e.__cause__ is not None else str(e)) from e.__cause__
    if kind == "node" and final_dense is None:
        raise AdapterError(f"{type(net).__name__}: concern identification needs the logits to be the output of a "
                           "dense layer (nn.Dense / nnx.Linear) called last")
    convs = {c.path: c for c in calls if c.kind == "conv"}
    if not convs:
        raise AdapterError(f"{type(net).__name__} has no conv layer that could be intercepted (flax Conv); "
                           "the kernel-mask methods need at least one")
    if len(out) != 2:
        raise AdapterError(f"the model's output must be logits [B, K]; got shape {out}")
    if num_classes is not None and out[1] != num_classes:
        raise AdapterError(f"num_classes={num_classes} but the model's logits have {out[1]} columns")
    if len({c.path for c in calls}) != len(calls):
        raise AdapterError("a conv, norm or dense layer is called more than once per forward pass (weight sharing); "
                           "declare mask_points explicitly for layers called once")
    return calls, out, final_dense, convs


def _verified(model: AdaptedCNN, build) -> AdaptedCNN:
    """``model``, or the model with its failing points moved to their convs' outputs; raises
    when a point still does not drop its kernel."""
    bad = failing_points(model)
    if not bad:
        return model
    names = {n for n, _ in bad}
    moved = {**model.placements(), **{c: "conv" for p in model.mask_points() if p.name in names for c in p.layers}}
    if moved != model.placements():
        model = build(moved)
        bad = failing_points(model)
    if bad:
        raise AdapterError(
            "masking a channel of mask point(s) " + ", ".join(f"{n!r} (max difference {d:.3g})" for n, d in bad)
            + " does not equal the model with that kernel zeroed, even at the conv's output: their outputs reach "
            "the logits another way (shared weights, an operation the tracer does not follow); leave them out "
            "with mask_points=[...]")
    return model


def _require_relu_nodes(model: AdaptedCNN) -> None:
    shapes = {n.name: n.shape for n in model.nodes()}
    fed = relu_inputs(lambda keeps, x: model.node_forward(x, keeps), shapes, model.input_shape)
    bad = [n for n, ok in fed.items() if not ok]
    if bad:
        raise AdapterError(
            f"concern identification reads a node as a ReLU's input (active where > 0), but node(s) {bad} of "
            f"{model.arch} feed something else (e.g. a pre-activation block's Add read by a BatchNorm, or another "
            "activation): decomposing it would lose accuracy silently. Use kind='kernel' (GradSplitter, "
            "CNNSplitter), or pass require_relu=False to adapt it anyway")


def _group(convs: Mapping[str, LayerCall], chosen: Sequence[str], ties) -> list[MaskPoint]:
    """Mask points of the ``chosen`` convs (in call order), tied groups sharing one (named
    after the group's first conv)."""
    tied = {q: g[0] for g in ties for q in g}
    groups: dict[str, list[str]] = {}
    for path in [c for c in convs if c in set(chosen) | set(tied)]:
        groups.setdefault(tied.get(path, path), []).append(path)
    points = []
    for head, members in groups.items():
        sizes = {convs[m].out_shape[-1] for m in members}
        if len(sizes) != 1:
            raise AdapterError(f"tied convs {members} have different output channels {sorted(sizes)}")
        points.append(MaskPoint(head, sizes.pop(), tuple(members)))
    return points
