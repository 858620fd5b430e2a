"""Token log-probabilities from a decoder's last hidden states and its LM head, a chunk of tokens at a time.

A causal LM's loss over ``N`` tokens and a vocabulary of ``V`` materializes ``(N, V)`` logits, a float32 copy for the
cross-entropy and, in the backward pass, their gradient: for DeepSeek-Coder's 32,256-token vocabulary that is about
0.4 MiB per token, more than everything else a checkpointed 1.3B-parameter model keeps per token. Here the LM head and
its log-softmax run ``chunk`` tokens at a time and keep nothing of that size: the forward pass keeps one float32
log-probability per token, and the backward pass recomputes each chunk's logits to get its gradient (one more LM-head
matmul per token, about 5% more compute for a 1.3B model). Only the tokens whose log-probability is wanted go through
the head (completion tokens, not the prompt or padding). With ``entropy`` the same chunks give each position's entropy
too (the online objectives' entropy bonus and metric), with its gradient.

The head runs inside the model's own forward pass (:func:`head_in_chunks` stands in for the head module's forward
while a pass runs): there the head's weight is whole wherever the model's is sharded (an FSDP unit, a ZeRO-3
partition: both gather it for the module's forward, and again for its backward), and the pass's output, which FSDP and
DeepSpeed hook for the backward, is what the loss uses.

:func:`chunked_target_logps` is the numerical kernel, :func:`head_logps` applies it at the wanted positions of a batch;
:func:`lm_head` finds the head of a transformers causal LM (under a peft wrapper too), and
:class:`ChunkedLogpsCheck` records whether the chunked head agrees with the model's own logits (checked once per run:
an architecture that scales or caps its logits, or computes them without calling its head module, does not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lit_align.losses import IGNORE_INDEX
from lit_align.modules.packed_pairs import PackingCheck

log = logging.getLogger(__name__)


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per row and, with ``with_entropy``, the distribution's entropy,
    ``chunk`` rows at a time (see :func:`chunked_target_logps`)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                dtype: torch.dtype, with_entropy: bool) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        n = hidden.size(0)
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        for s in range(0, n, chunk):
            logits = _logits(hidden[s:s + chunk].to(dtype), w, b)
            lse = logits.logsumexp(-1)
            logps[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse
            if with_entropy:  # H = logsumexp(z) - sum_i p_i z_i
                entropy[s:s + chunk] = lse - _row_dot(logits.softmax(-1), logits)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        if grad_logps is None and (grad_entropy is None or grad_entropy.numel() == 0):
            return grad_hidden, grad_weight, grad_bias, None, None, None, None
        for s in range(0, hidden.size(0), chunk):
            h = hidden[s:s + chunk].to(dtype)
            logits = _logits(h, w, b)
            probs = logits.softmax(-1)
            # two (chunk x V) tensors at most: the entropy's gradient is written over the logits, the log-probability's
            # over the probabilities
            d_logits = None
            if grad_entropy is not None and grad_entropy.numel():  # d H / d z = -p (z - sum_i p_i z_i)
                d_logits = logits.sub_(_row_dot(probs, logits)[:, None]).mul_(probs)
                d_logits.mul_(grad_entropy[s:s + chunk, None].float().neg())
            del logits
            if grad_logps is not None:  # d log p[target] / d z = onehot(target) - p
                g = grad_logps[s:s + chunk, None].float()
                d_target = probs.mul_(g.neg()).scatter_add_(1, targets[s:s + chunk, None], g)
                d_logits = d_target if d_logits is None else d_logits.add_(d_target)
            del probs
            d_logits = d_logits.to(dtype)
            if need_hidden:
                grad_hidden[s:s + chunk] = d_logits @ w
            if need_weight:
                if d_logits.dtype == grad_weight.dtype:
                    grad_weight.addmm_(d_logits.t(), h)  # in place: no (V x H) temporary
                else:
                    grad_weight.add_(d_logits.t() @ h)
            if need_bias:
                grad_bias.add_(d_logits.float().sum(0))
            del d_logits
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None, None, None)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for (n, V) tensors, through a batched matmul: no (n x V) temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One chunk's logits in float32 (the matmul in ``hidden``'s dtype, as the LM head computes them)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


def chunked_target_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                         dtype: torch.dtype | None = None, entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax(hidden @ weight.T + bias)[n, targets[n]]`` for each of the ``N`` rows of ``hidden`` (N, H), as
    float32 (N,), without an ``(N, V)`` tensor beyond one chunk of ``chunk`` rows, in the forward or the backward
    pass; with ``entropy``, also each row's distribution's entropy (N,) (a tuple). The matmul runs in ``dtype``
    (default: ``weight``'s; the autocast dtype under autocast, as an LM head would), the softmax in float32. Gradients
    flow to ``hidden``, ``weight`` and ``bias`` where they require them, from either output."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if dtype is None:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        logps, entropies = _ChunkedTargetLogps.apply(hidden, weight, bias, targets, chunk, dtype, entropy)
    return (logps, entropies) if entropy else logps


def lm_head(net: nn.Module) -> nn.Linear | None:
    """The LM head of a transformers causal LM (or of a peft model over one), a plain ``nn.Linear``; None for anything
    else (a head with an adapter or quantized weights, a model without ``get_output_embeddings``)."""
    base = net.get_base_model() if hasattr(net, "get_base_model") and hasattr(net, "peft_config") else net
    get_head = getattr(base, "get_output_embeddings", None)
    try:
        head = get_head() if get_head is not None else None
    except (AttributeError, NotImplementedError):
        return None
    return head if type(head) is nn.Linear else None


def head_logps(head: nn.Linear, hidden: Tensor, targets: Tensor, chunk: int, entropy: bool = False) -> Tensor:
    """``head``'s log-probabilities of ``targets`` (B, n; ``IGNORE_INDEX`` where none is wanted) from the last hidden
    states ``hidden`` (B, n, H) at the positions that predict them, through :func:`chunked_target_logps` at the wanted
    positions only: float32 (B, n, 1), or with ``entropy`` (B, n, 2), the entropy of each position's distribution
    second; 0 where nothing is wanted."""
    mask = targets != IGNORE_INDEX
    wanted = chunked_target_logps(hidden[mask], head.weight, head.bias, targets[mask], chunk, entropy=entropy)
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    return torch.stack([zeros.masked_scatter(mask, w) for w in (wanted if entropy else (wanted,))], dim=-1)


HeadCall = tuple[Callable[[Tensor], Tensor], Tensor] | None
"""What the LM head computes at one call under :func:`head_in_chunks`: ``(select, targets)``, :func:`head_logps` of
``targets`` from ``select(hidden states the head was given)``; None: the head's own logits."""


class HeadNotCalled(RuntimeError):
    """The model's forward did not call its LM head module as often as :func:`head_in_chunks` was told it would."""


@contextmanager
def head_in_chunks(net: nn.Module, calls: Sequence[HeadCall], chunk: int, entropy: bool = False) -> Iterator[None]:
    """While open, the ``i``-th call of ``net``'s LM head module (:func:`lm_head`) computes ``calls[i]``
    (:data:`HeadCall`) in chunks of ``chunk`` tokens instead of logits, so a pass of ``net`` returns those
    log-probabilities (and entropies) as its ``logits``. The head's weight is read inside the model's forward, where
    it is whole also under FSDP and ZeRO-3. Raises :class:`HeadNotCalled` where the head module was called more or
    fewer times (a model that computes its logits without calling it)."""
    head = lm_head(net)
    pending = list(calls)
    own = head.__dict__.get("forward")  # an instance-level forward someone else set, restored after

    def forward(hidden: Tensor) -> Tensor:
        if not pending:
            raise HeadNotCalled("the LM head module was called more often than the pass was planned for")
        call = pending.pop(0)
        if call is None:
            return own(hidden) if own is not None else type(head).forward(head, hidden)
        select, targets = call
        return head_logps(head, select(hidden), targets, chunk, entropy)

    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    if pending:
        raise HeadNotCalled(f"this model's forward did not call its LM head module ({len(pending)} planned call(s) "
                            f"left): it computes its logits some other way")


def check_chunk_size(logits_chunk_size: int | None, module: nn.Module | None = None,
                     owner: type | None = None) -> None:
    """Refuse a ``logits_chunk_size`` option below 1 (null is fine), before anything is built; and one set on
    ``module`` whose class overrides ``owner``'s ``compute_loss(logits, labels)``, which takes whole logits."""
    if logits_chunk_size is not None and (isinstance(logits_chunk_size, bool) or logits_chunk_size < 1):
        raise ValueError(f"logits_chunk_size must be >= 1 (tokens per chunk) or null, got {logits_chunk_size}")
    if logits_chunk_size is not None and owner is not None and type(module).compute_loss is not owner.compute_loss:
        raise ValueError(f"logits_chunk_size needs {owner.__name__}'s own loss: {type(module).__name__} overrides "
                         f"compute_loss(logits, labels), which takes whole logits; leave logits_chunk_size null")


class ChunkedLogpsCheck(PackingCheck):
    """Whether a module may compute log-probabilities through :func:`chunked_target_logps`: its network has a plain
    linear LM head (:func:`lm_head`), and the run's first chunked pass gave what the model's
    own logits give (checked once, without gradient; a model that scales, caps or post-processes its logits differs,
    and one whose forward does not call its head module cannot run it: :class:`HeadNotCalled`)."""

    warning = ("lit_align: log-probabilities through the chunked LM head differ from this model's logits (largest "
               "difference %.3g); computing the logits whole (logits_chunk_size has no effect)")

    def usable(self, net: nn.Module) -> bool:
        return self.ok is not False and lm_head(net) is not None

    def allows(self, net: nn.Module, compare: Callable[[], tuple[Tensor, Tensor, Tensor | float, bool]]) -> bool:
        try:
            return super().allows(net, compare)
        except HeadNotCalled as err:
            self.ok = False
            log.warning("lit_align: %s; computing the logits whole (logits_chunk_size has no effect)", err)
            return False


__all__ = ["ChunkedLogpsCheck", "HeadCall", "HeadNotCalled", "check_chunk_size", "chunked_target_logps", "head_in_chunks",
           "head_logps", "lm_head"]
