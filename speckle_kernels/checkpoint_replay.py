"""The norm layers under activation checkpointing: a recompute replays its forward's state.

torch.utils.checkpoint runs a layer's forward twice: once in the forward pass (saving nothing),
again in the backward pass to rebuild what the backward needs. A BatchRenorm layer's training
call is not a pure function of its input: it reads the running statistics and the step counter
(r, d and the r_max/d_max schedule come from them) and updates them in place. Run twice, the
recompute would read buffers already updated once, so its y, its stats and hence dx differ
from the forward's (6 % relative in dx, measured 2026-12-03), and it would update them a
second time. The norm block's dropout mask is the other state: it is keyed by (seed, offset).

What a recompute must see is the forward's state, and what it must not do is update it. So:

    mask      (seed, offset) is drawn for every training call from torch's generator of the
              input's device (batch_renorm_act_contract.draw_rng), the way nn.Dropout draws its
              mask. checkpoint saves that generator's state and restores it before the
              recompute (preserve_rng_state, its default), so the recompute draws the same mask.
    buffers   a training call that checkpointing may recompute records a snapshot of
              (running_mean, running_std, num_batches_tracked) before it runs. A training call
              made inside a backward pass (torch._C._current_graph_task_id() != -1: where both
              checkpoint modes recompute) is a recompute: it runs the same op on scratch copies
              of its forward's snapshot, so r, d, the schedule and every stats row are the
              forward's, bit for bit, and the module's buffers are not touched.

Which calls may be recomputed: those made with grad disabled (the reentrant checkpoint runs its
forward under no_grad) or under saved-tensor hooks (the non-reentrant checkpoint's forward
stores placeholders through them). A plain training call records nothing and costs nothing.
Which snapshot a recompute takes: recomputes run in the reverse order of their forwards (the
backward visits later work first), so within one backward pass the k-th recompute of a module
takes its k-th most recent snapshot; a new backward pass (another graph task: the next step,
or a retain_graph second pass) starts again from the most recent. A module keeps its last
DEPTH snapshots (a few C floats each).

The designs compared (2026-12-03):
  - r and d as outputs of the forward op, reused by the recompute through a per-call token.
    Reusing them needs an "apply only" op in every backend (the C++/CUDA extensions have none),
    and a token that both calls can compute: a per-call draw from torch's generator changes
    the random streams of every other layer between a plain and a checkpointed run, or a
    device-side lookup costs kernels in every call. The snapshot needs neither: the recompute
    calls the very op of the forward.
  - The reentrant checkpoint runs its first forward under no_grad, so "update only with grad
    enabled" (fairscale's patch_batchnorm) fixes that mode alone, and breaks the training-mode
    no_grad pass that recalibrates statistics.
  - Selective-checkpoint policies (context_fn=create_selective_checkpoint_contexts) can save an
    op's outputs for the recompute, but only in the non-reentrant mode, only when the user
    passes the policy, and only for dispatcher ops (the Triton eager path launches kernels
    outside it).
  - torch.compile: inside a compiled function the partitioner decides what to recompute, and
    in a checkpointed region it recomputes every op, the statistics too, from buffers the
    forward has already updated (y equal, dweight 0.5 % off in a measured case). This module
    is bypassed while tracing; checkpoint_context() below is the selective-checkpoint policy
    that saves the statistics ops' outputs instead, which makes compiled checkpointed regions
    exact (tests/test_checkpoint.py) and is harmless in eager mode.

Limits: the recompute must draw the same mask, so preserve_rng_state=False with dropout gives
another mask (as for nn.Dropout); a training call with grad disabled or under other
saved-tensor hooks between a checkpointed forward and its backward (say, a no_grad pass in
train mode) takes a recompute's place in the order above; a compiled module called inside an
eager checkpoint is replayed as compiled code, which updates the buffers again; under
torch.compile a checkpointed region needs context_fn=checkpoint_context (fused backends: the
reference backend's r and d are plain torch ops that no policy can single out).
"""
from __future__ import annotations

from collections import deque

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from . import _ext

DEPTH = 8

# torch's probe of the innermost saved-tensor hooks (used by AOTAutograd); without it every
# training call is treated as possibly checkpointed (a snapshot each: correct, a little slower)
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _may_be_recomputed() -> bool:
    if not torch.is_grad_enabled():
        return True
    return _TOP_HOOKS is None or _TOP_HOOKS(True) is not None


def in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass on this thread: where a checkpoint
    recomputes its forward."""
    return torch._C._current_graph_task_id() != -1


class RecomputeReplay:
    """A module's snapshots of its running buffers, for the recomputes of checkpointing."""

    def __init__(self, depth: int = DEPTH):
        self.snapshots: deque = deque(maxlen=depth)
        self.task, self.taken = None, 0

    def clear(self) -> None:
        self.snapshots.clear()
        self.task, self.taken = None, 0

    def buffers(self, running_mean, running_std, num_batches_tracked):
        """The (running_mean, running_std, num_batches_tracked) a training call reads and
        updates: the module's own (after a snapshot, when the call may be recomputed), or, in a
        recompute, scratch copies of its forward's snapshot."""
        own = (running_mean, running_std, num_batches_tracked)
        if torch.compiler.is_compiling():
            return own
        if in_backward_pass():
            task = torch._C._current_graph_task_id()
            if task != self.task:
                self.task, self.taken = task, 0
            self.taken += 1
            if self.taken <= len(self.snapshots):
                return tuple(t.clone() for t in self.snapshots[-self.taken])
            return own  # nothing recorded: a training call inside a backward hook runs as usual
        if _may_be_recomputed():
            self.snapshots.append(tuple(t.detach().clone() for t in own))
        return own


def statistics_ops() -> set:
    """The registered ops that read and update the running buffers (and return the stats)."""
    ops = {torch.ops.speckle_kernels.batch_renorm_triton_statistics.default}
    if _ext.HAS_CPU_EXT:
        lib = torch.ops.speckle_kernels
        ops |= {lib.batch_renorm_forward.default, lib.batch_renorm_act_forward.default,
                lib.batch_renorm_stats.default}
    return ops


def save_statistics_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: keep the statistics ops' outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in statistics_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_context():
    """context_fn for torch.utils.checkpoint(fn, ..., use_reentrant=False, context_fn=...) where
    fn runs under torch.compile: the recompute takes the forward's statistics instead of
    computing them again from updated buffers."""
    return create_selective_checkpoint_contexts(save_statistics_policy)

