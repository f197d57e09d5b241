"""LayerStack: the one layered-image type (background + foregrounds back to front, with masks).

Compositing follows METHOD.md section 1: C_0 = B; C_k = M_k * F_k + (1 - M_k) * C_{k-1}.
A stack is immutable: every operation returns a new stack and never writes into a tensor it was
given (ComfyUI hands the same output object to several nodes). Callers must not write into a
stack's tensors either.

Why long: one class, whose methods (compositing, layer and batch operations, transforms) are the
type's whole surface for the nodes, the sampler and the editors; a second module would only hold
half of them.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerdiff.config import LAYER_CHANNELS
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.stack")

EXPOSED_GREY = 0.5  # image value where a transform exposes empty canvas (METHOD.md section 1 choice)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(t, axes: str, want: tuple, what: str, fix: str = "") -> None:
    """LayerDiffError unless `t` is a float tensor of shape `want` (None = any size); the
    message shows the axes, the wanted and the actual shapes."""
    if not isinstance(t, torch.Tensor):
        raise LayerDiffError(f"{what} must be a {axes} tensor, got {type(t).__name__}")
    if t.ndim != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want)):
        shown = "(" + ", ".join("?" if w is None else str(w) for w in want) + ")"
        raise LayerDiffError(f"{what} must be {axes} = {shown}, got {_shape(t)}{fix}")
    if not t.is_floating_point():
        raise LayerDiffError(f"{what} has dtype {t.dtype}; convert it to float (0..1 for pixels)")


def _as_int(value, what: str) -> int:
    """An int from an int-like value (numpy ints, integral floats); LayerDiffError otherwise."""
    if isinstance(value, bool):
        raise LayerDiffError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LayerDiffError(f"{what} must be a whole number, got {value!r}") from None


def _as_tuple(values, length: int, default, what: str, kind, kind_name: str) -> tuple:
    if values is None or (isinstance(values, Sequence) and not isinstance(values, str) and len(values) == 0):
        return tuple(default(i) for i in range(length))
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise LayerDiffError(f"{what} must be a sequence of {length} values (one per layer), got {values!r}")
    values = tuple(values)
    if len(values) != length:
        raise LayerDiffError(
            f"{what} has {len(values)} entries but the stack has {length} layers: give one per layer, "
            f"background first"
        )
    for v in values:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise LayerDiffError(f"{what} entry {v!r} has type {type(v).__name__}; expected {kind_name}")
    return values


def default_name(index: int, prompt: str = "") -> str:
    """The automatic name of layer ``index``: 'background' / 'layer 1', with its prompt after a colon
    when it has one ('layer 1: a red star'); 60 characters at most (PSD layer names)."""
    head = "background" if index == 0 else f"layer {index}"
    return f"{head}: {prompt}"[:60] if prompt else head


# automatic names, also as earlier versions wrote them for unnamed layers ('layer_1')
_AUTOMATIC = re.compile(r"^(background|layer[ _]\d+)(: (?P<prompt>.*))?$")


def automatic_name(name: str) -> tuple[bool, str]:
    """(whether ``name`` is an automatic name, the prompt it carries or "")."""
    m = _AUTOMATIC.match(name.strip())
    return (m is not None, (m.group("prompt") or "") if m else "")


@dataclass(frozen=True, eq=False, repr=False)
class LayerStack:
    """A batch of B composable images with L = 1 + K layers, layer 0 the background.

    images: (B, L, H, W, 3) float in 0..1; masks: (B, K, H, W) float in 0..1 (1 = object) for the
    foregrounds 1..K; latents: (B, L, 8, h, w) or None. names/prompts/seeds: one per layer, seeds
    for batch sample 0 (None = unknown). Empty names/prompts/seeds are filled with defaults.
    """

    images: torch.Tensor
    masks: torch.Tensor
    latents: torch.Tensor | None = None
    names: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    global_prompt: str = ""
    seeds: tuple[int | None, ...] = ()

    def __post_init__(self):
        im = self.images
        _check_tensor(im, "(B, L, H, W, 3)", (None, None, None, None, 3), "LayerStack images")
        b, n_layers, h, w, _ = im.shape
        if n_layers < 1:
            raise LayerDiffError(
                f"LayerStack images {_shape(im)} have no layers: at least the background is needed"
            )
        per_fg = f" for images {_shape(im)}: one mask per foreground"
        _check_tensor(self.masks, "(B, K, H, W)", (b, n_layers - 1, h, w), "LayerStack masks", per_fg)
        if self.masks.device != im.device:
            raise LayerDiffError(
                f"LayerStack masks are on {self.masks.device} but images on {im.device}: use one"
            )
        if self.latents is not None:
            want = (b, n_layers, LAYER_CHANNELS, None, None)
            fix = f" for images {_shape(im)}; pass latents=None if there are none"
            _check_tensor(self.latents, "(B, L, 8, h, w)", want, "LayerStack latents", fix)
        if not isinstance(self.global_prompt, str):
            raise LayerDiffError(f"global_prompt must be a string, got {self.global_prompt!r}")
        set_ = object.__setattr__  # frozen dataclass: normalised once, here
        set_(self, "names", _as_tuple(self.names, n_layers, default_name, "names", str, "str"))
        set_(self, "prompts", _as_tuple(self.prompts, n_layers, lambda i: "", "prompts", str, "str"))
        seeds = _as_tuple(self.seeds, n_layers, lambda i: None, "seeds", (int, type(None)), "int or None")
        set_(self, "seeds", seeds)

    def __repr__(self) -> str:
        lat = "None" if self.latents is None else _shape(self.latents)
        return (
            f"LayerStack(images={_shape(self.images)}, masks={_shape(self.masks)}, latents={lat}, "
            f"names={self.names}, dtype={self.images.dtype}, device={self.images.device})"
        )

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    @property
    def num_layers(self) -> int:
        return self.images.shape[1]

    @property
    def num_foregrounds(self) -> int:
        return self.images.shape[1] - 1

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    def _replace(self, **changes) -> LayerStack:
        return dataclasses.replace(self, **changes)

    def _layer_index(self, i, foreground_only: bool = False, what: str = "layer index") -> int:
        i = _as_int(i, what)
        n = self.num_layers
        if not 0 <= i < n:
            raise LayerDiffError(f"{what} {i} is out of range for a stack of {n} layers (0..{n - 1})")
        if foreground_only and i == 0:
            rng = f"1..{n - 1}" if n > 1 else "none: the stack has only a background"
            raise LayerDiffError(
                f"{what} 0 is the background, which cannot be used here; foregrounds are {rng}"
            )
        return i

    # ---- compositing and views -----------------------------------------------------------------

    def composite(self) -> torch.Tensor:
        """Flat image (B, H, W, 3): C_0 = B; C_k = M_k F_k + (1 - M_k) C_{k-1} (METHOD.md sec. 1)."""
        out = self.images[:, 0]  # (B, H, W, 3)
        for k in range(1, self.num_layers):
            m = self.masks[:, k - 1].unsqueeze(-1)  # (B, H, W, 1)
            out = m * self.images[:, k] + (1 - m) * out
        return out

    def _alphas(self) -> torch.Tensor:
        """(B, L, H, W): ones for the background, then the foreground masks."""
        b, _, h, w, _ = self.images.shape
        return torch.cat([self.masks.new_ones(b, 1, h, w), self.masks], dim=1)

    def rgba(self) -> torch.Tensor:
        """(B, L, H, W, 4): layer RGB with alpha = 1 for the background and the mask for foregrounds."""
        alpha = self._alphas().to(self.images.dtype).unsqueeze(-1)  # (B, L, H, W, 1)
        return torch.cat([self.images, alpha], dim=-1)

    def layer_rgba(self, i: int) -> torch.Tensor:
        """(B, H, W, 4) for layer i (background alpha 1)."""
        i = self._layer_index(i)
        if i == 0:
            alpha = self.images.new_ones(self.images.shape[:1] + self.images.shape[2:4])
        else:
            alpha = self.masks[:, i - 1].to(self.images.dtype)
        return torch.cat([self.images[:, i], alpha.unsqueeze(-1)], dim=-1)

    def flat_rgba_batch(self) -> torch.Tensor:
        """(B*L, H, W, 4), sample-major: b0 l0, b0 l1, ..., b0 l(L-1), b1 l0, ... (the layout a
        ComfyUI IMAGE batch of all layers uses; row b*L + l is sample b, layer l)."""
        b, n_layers, h, w, _ = self.images.shape
        return self.rgba().reshape(b * n_layers, h, w, 4)  # (B, L, H, W, 4) -> (B*L, H, W, 4)

    def flat_masks(self) -> torch.Tensor:
        """(B*L, H, W), sample-major like flat_rgba_batch; the background's mask is all ones."""
        b, n_layers, h, w, _ = self.images.shape
        return self._alphas().reshape(b * n_layers, h, w)  # (B, L, H, W) -> (B*L, H, W)

    def binarized(self, threshold: float = 0.5) -> LayerStack:
        """Hard 0/1 masks (mask > threshold), each pixel owned by at most one foreground: the
        frontmost whose mask is set, matching what composite() shows. Latents are kept (they still
        describe the same layout; occluded parts of back layers stay in their latents)."""
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
            raise LayerDiffError(f"mask threshold {threshold!r} must be a number in [0, 1), e.g. 0.5")
        hard = self.masks > threshold  # (B, K, H, W) bool
        taken = torch.zeros_like(hard[:, :1]).squeeze(1)  # (B, H, W): owned by a layer in front
        out = torch.zeros_like(hard)
        for k in reversed(range(self.num_foregrounds)):  # front to back
            out[:, k] = hard[:, k] & ~taken
            taken = taken | out[:, k]
        return self._replace(masks=out.to(self.masks.dtype))

    # ---- layer selection and order -------------------------------------------------------------

    def select_layers(self, indices: Sequence[int]) -> LayerStack:
        """New stack of the given layers in the given order; index 0 (background) must come first.
        Latents, names, prompts and seeds follow their layers exactly."""
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
            raise LayerDiffError(f"layer indices must be a list of integers starting with 0, got {indices!r}")
        idx = [self._layer_index(i) for i in indices]
        if not idx or idx[0] != 0:
            raise LayerDiffError(
                f"layer indices {list(indices)} must start with 0: the background stays layer 0"
            )
        if len(set(idx)) != len(idx):
            raise LayerDiffError(f"layer indices {idx} repeat a layer; list each layer at most once")
        fg = [i - 1 for i in idx[1:]]
        return self._replace(
            images=self.images[:, idx],  # (B, L', H, W, 3)
            masks=self.masks[:, fg],  # (B, L'-1, H, W)
            latents=None if self.latents is None else self.latents[:, idx],  # (B, L', 8, h, w)
            names=tuple(self.names[i] for i in idx),
            prompts=tuple(self.prompts[i] for i in idx),
            seeds=tuple(self.seeds[i] for i in idx),
        )

    def remove_layer(self, i: int) -> LayerStack:
        """Stack without foreground i (1..K); the background cannot be removed."""
        if _as_int(i, "layer index") == 0:
            raise LayerDiffError(
                "layer index 0 is the background, which cannot be removed; use replace_layer(0, image=...) "
                "to change it"
            )
        i = self._layer_index(i, foreground_only=True)
        return self.select_layers([j for j in range(self.num_layers) if j != i])

    def reorder(self, order: Sequence[int]) -> LayerStack:
        """Reorder the foregrounds: order is a permutation of 1..K, back to front; new layer p + 1
        is old layer order[p]. The background stays layer 0."""
        want = list(range(1, self.num_layers))
        if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
            raise LayerDiffError(f"order must be a permutation of {want}, got {order!r}")
        got = [_as_int(o, "order entry") for o in order]
        if sorted(got) != want:
            raise LayerDiffError(
                f"order {got} is not a permutation of the foreground indices {want}; list every foreground "
                f"once, back to front (the background stays 0)"
            )
        return self.select_layers([0, *got])

    def move_layer(self, i: int, to: int) -> LayerStack:
        """Move foreground i to position `to` (both 1..K), shifting the layers in between."""
        i = self._layer_index(i, foreground_only=True)
        to = self._layer_index(to, foreground_only=True, what="target position")
        order = list(range(1, self.num_layers))
        order.insert(to - 1, order.pop(i - 1))
        return self.reorder(order)

    # ---- pixel transforms (drop latents: they no longer match) --------------------------------

    def translate_layer(self, i: int, dx: int, dy: int) -> LayerStack:
        """Shift foreground i by (dx, dy) whole pixels (+x right, +y down). Exposed area gets mask 0
        and grey 0.5 image; content moved off the canvas is lost. Latents are dropped (None)."""
        i = self._layer_index(i, foreground_only=True)
        dx, dy = _as_int(dx, "dx"), _as_int(dy, "dy")
        h, w = self.height, self.width
        image = torch.full_like(self.images[:, i], EXPOSED_GREY)  # (B, H, W, 3)
        mask = torch.zeros_like(self.masks[:, i - 1])  # (B, H, W)
        if abs(dx) < w and abs(dy) < h:
            ys, yd = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
            xs, xd = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
            image[:, yd, xd] = self.images[:, i, ys, xs]
            mask[:, yd, xd] = self.masks[:, i - 1, ys, xs]
        return self._set_layer_pixels(i, image, mask)

    def mask_bbox_centers(self, i: int) -> torch.Tensor:
        """(B, 2) centre (x, y) of foreground i's mask bbox (mask > 0.5), in continuous pixel
        coordinates (0 = left/top edge, W/H = right/bottom edge); the canvas centre if empty."""
        i = self._layer_index(i, foreground_only=True)
        h, w = self.height, self.width
        on = self.masks[:, i - 1] > 0.5  # (B, H, W)
        centers = torch.tensor([[w / 2, h / 2]], dtype=torch.float64).repeat(self.batch_size, 1)
        for b in range(self.batch_size):
            ys, xs = torch.nonzero(on[b], as_tuple=True)
            if len(xs):
                # pixels x0..x1 cover [x0, x1 + 1): centre (x0 + x1 + 1) / 2
                centers[b, 0] = (xs.min().item() + xs.max().item() + 1) / 2
                centers[b, 1] = (ys.min().item() + ys.max().item() + 1) / 2
        return centers

    def scale_layer(self, i: int, factor: float, center: tuple[float, float] | None = None) -> LayerStack:
        """Scale foreground i by `factor` about `center` (x, y) in continuous pixel coordinates, by
        default each sample's mask bbox centre; bilinear resampling. Exposed area gets mask 0 and
        grey 0.5 image. Latents are dropped (None)."""
        i = self._layer_index(i, foreground_only=True)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise LayerDiffError(f"scale factor {factor!r} must be a number > 0 (e.g. 0.5 halves, 2 doubles)")
        b, h, w = self.batch_size, self.height, self.width
        if center is None:
            c = self.mask_bbox_centers(i)  # (B, 2)
        else:
            try:
                cx, cy = (float(v) for v in center)
            except (TypeError, ValueError):
                raise LayerDiffError(
                    f"scale center {center!r} must be a pair of numbers (x, y) in pixels"
                ) from None
            c = torch.tensor([[cx, cy]], dtype=torch.float64).repeat(b, 1)
        # Output point n (normalised, align_corners=False) samples input c + (n - c) / factor.
        nc = torch.stack([2 * c[:, 0] / w - 1, 2 * c[:, 1] / h - 1], dim=1)  # (B, 2)
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / factor
        theta[:, :, 2] = nc * (1 - 1 / factor)
        src = torch.cat(
            [self.images[:, i], self.masks[:, i - 1].unsqueeze(-1).to(self.images.dtype)], dim=-1
        )  # (B, H, W, 4)
        src = torch.cat([src, torch.ones_like(src[..., :1])], dim=-1)  # (B, H, W, 5): + coverage
        work = torch.float64 if src.dtype == torch.float64 else torch.float32
        src = src.permute(0, 3, 1, 2).to(work)  # (B, 5, H, W)
        grid = F.affine_grid(theta.to(work), [b, 5, h, w], align_corners=False)  # (B, H, W, 2)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out.permute(0, 2, 3, 1)  # (B, H, W, 5)
        cover = out[..., 4:5]
        # zero padding already weights the colour by coverage; fill the rest with grey
        image = (out[..., :3] + EXPOSED_GREY * (1 - cover)).clamp(0, 1).to(self.images.dtype)
        mask = out[..., 3].clamp(0, 1).to(self.masks.dtype)
        return self._set_layer_pixels(i, image, mask)

    def _set_layer_pixels(self, i: int, image: torch.Tensor, mask: torch.Tensor | None) -> LayerStack:
        images = self.images.clone()
        images[:, i] = image
        masks = self.masks
        if mask is not None:
            masks = masks.clone()
            masks[:, i - 1] = mask
        if self.latents is not None:
            logger.debug("layer %d pixels changed: latents dropped", i)
        return self._replace(images=images, masks=masks, latents=None)

    def replace_layer(
        self, i, image=None, mask=None, latent=None, prompt=None, name=None, seed=None
    ) -> LayerStack:
        """Replace parts of layer i: image (B, H, W, 3), mask (B, H, W) (foregrounds only), latent
        (B, 8, h, w), prompt, name, seed. None keeps the current value. New pixels without a new
        latent drop the stack's latents (they would no longer match)."""
        i = self._layer_index(i)
        b, h, w = self.batch_size, self.height, self.width
        images, masks, latents = self.images, self.masks, self.latents
        if image is not None:
            _check_tensor(image, "(B, H, W, 3)", (b, h, w, 3), f"replacement image for layer {i}")
            images = images.clone()
            images[:, i] = image.to(images)
        if mask is not None:
            if i == 0:
                raise LayerDiffError(
                    "layer 0 is the background, which has no mask; pass mask only for layers 1..K"
                )
            _check_tensor(mask, "(B, H, W)", (b, h, w), f"replacement mask for layer {i}")
            masks = masks.clone()
            masks[:, i - 1] = mask.to(masks)
        if latent is not None:
            if latents is None:
                raise LayerDiffError(
                    f"cannot replace layer {i}'s latent: the stack has no latents; encode all layers and "
                    f"use with_latents(...)"
                )
            _check_tensor(
                latent, "(B, 8, h, w)", (b, *latents.shape[2:]), f"replacement latent for layer {i}"
            )
            latents = latents.clone()
            latents[:, i] = latent.to(latents)
        elif (image is not None or mask is not None) and latents is not None:
            logger.debug("layer %d pixels replaced without a latent: latents dropped", i)
            latents = None

        def put(values: tuple, new):
            return values if new is None else values[:i] + (new,) + values[i + 1 :]

        return self._replace(
            images=images,
            masks=masks,
            latents=latents,
            names=put(self.names, name),
            prompts=put(self.prompts, prompt),
            seeds=put(self.seeds, seed),
        )

    # ---- batch ---------------------------------------------------------------------------------

    def select_batch(self, indices: Sequence[int]) -> LayerStack:
        """Samples `indices` (in that order). Seeds describe sample 0, so they are kept only when
        the new first sample is the old sample 0, else set to None."""
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not len(indices):
            raise LayerDiffError(f"batch indices must be a non-empty list of integers, got {indices!r}")
        b = self.batch_size
        idx = [_as_int(j, "batch index") for j in indices]
        for j in idx:
            if not 0 <= j < b:
                raise LayerDiffError(
                    f"batch index {j} is out of range for a batch of {b} samples (0..{b - 1})"
                )
        return self._replace(
            images=self.images[idx],
            masks=self.masks[idx],
            latents=None if self.latents is None else self.latents[idx],
            seeds=self.seeds if idx[0] == 0 else (None,) * self.num_layers,
        )

    @staticmethod
    def concat(stacks: Sequence[LayerStack]) -> LayerStack:
        """Concatenate along the batch axis. Layer counts, sizes and names must match; prompts and
        seeds come from the first stack; latents are kept only if every stack has them."""
        stacks = list(stacks)
        if not stacks or not all(isinstance(s, LayerStack) for s in stacks):
            raise LayerDiffError(f"concat needs a non-empty list of LayerStack, got {stacks!r}")
        first = stacks[0]
        for n, s in enumerate(stacks[1:], start=1):
            if s.num_layers != first.num_layers:
                raise LayerDiffError(
                    f"cannot concat: stack {n} has {s.num_layers} layers but stack 0 has {first.num_layers}; "
                    f"use select_layers/remove_layer to match"
                )
            if (s.height, s.width) != (first.height, first.width):
                raise LayerDiffError(
                    f"cannot concat: stack {n} is {s.width}x{s.height} but stack 0 is "
                    f"{first.width}x{first.height} (WxH); resize to one size first"
                )
            if s.names != first.names:
                raise LayerDiffError(
                    f"cannot concat: stack {n} has layer names {s.names} but stack 0 has {first.names}; "
                    f"rename layers with replace_layer(i, name=...)"
                )
            if s.prompts != first.prompts or s.global_prompt != first.global_prompt:
                logger.warning("concat: stack %d has other prompts than stack 0; keeping stack 0's", n)
        dev = first.images.device
        lats = [s.latents for s in stacks]
        keep = all(t is not None for t in lats) and len({tuple(t.shape[2:]) for t in lats}) == 1
        if not keep and any(t is not None for t in lats):
            logger.info("concat: not every stack has latents of one size; latents dropped")
        return first._replace(
            images=torch.cat([s.images.to(dev) for s in stacks]),
            masks=torch.cat([s.masks.to(dev) for s in stacks]),
            latents=torch.cat([t.to(lats[0].device) for t in lats]) if keep else None,
        )

    # ---- conversion ----------------------------------------------------------------------------

    def with_latents(self, latents: torch.Tensor | None) -> LayerStack:
        """Same stack with `latents` (B, L, 8, h, w), or None to drop them."""
        return self._replace(latents=latents)

    def to(self, device=None, dtype: torch.dtype | None = None) -> LayerStack:
        """Move every tensor to `device` (and float `dtype` if given)."""

        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return self._replace(images=mv(self.images), masks=mv(self.masks), latents=mv(self.latents))

    @classmethod
    def from_rgba(
        cls,
        background: torch.Tensor,
        foregrounds: Sequence[torch.Tensor] = (),
        names: Sequence[str] | None = None,
        prompts: Sequence[str] | None = None,
        global_prompt: str = "",
        seeds: Sequence[int | None] | None = None,
    ) -> LayerStack:
        """Stack from a background (B, H, W, 3) and foregrounds (B, H, W, 4) whose alpha becomes
        the mask; foregrounds back to front. No latents."""
        drop_alpha = "; drop an alpha channel with [..., :3]"
        _check_tensor(background, "RGB (B, H, W, 3)", (None, None, None, 3), "background", drop_alpha)
        b, h, w, _ = background.shape
        for k, fg in enumerate(foregrounds, start=1):
            like = f" like the background {_shape(background)}"
            _check_tensor(fg, "RGBA (B, H, W, 4)", (b, h, w, 4), f"foreground {k}", like)
        fgs = [fg.to(background) for fg in foregrounds]
        images = torch.stack([background, *(fg[..., :3] for fg in fgs)], dim=1)  # (B, L, H, W, 3)
        if fgs:
            masks = torch.stack([fg[..., 3] for fg in fgs], dim=1)  # (B, K, H, W)
        else:
            masks = background.new_zeros(b, 0, h, w)
        return cls(
            images=images,
            masks=masks,
            names=tuple(names or ()),
            prompts=tuple(prompts or ()),
            global_prompt=global_prompt,
            seeds=tuple(seeds or ()),
        )
