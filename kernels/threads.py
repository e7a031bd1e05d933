"""CPU threads for a decode loop: one thread for its small ops, every thread for its big ones.

A decode step of a small model is a few hundred small ops (norms, RoPE, activations, sampling) around
a few matmuls. torch splits an op over its threads once it has more than a few thousand elements
(exp, sin, cos) or 32768 (most others), and on the 2-core machine of the README each hand-off to the
second thread costs about 50 us (the sleeping thread is woken through the kernel: OMP_WAIT_POLICY=
PASSIVE, which this project sets because spinning threads make a busy neighbour 40x slower). That is
more than most of these ops take on one thread: silu of a (64, 688) tensor takes 20 us on one thread
and 65 us on two. torch's CPU attention is worse still: with a few dozen keys per row each of its
(row, head) tasks takes 2.5x longer on two threads than on one, at any batch size.

So `rollout.generate` runs its decode loop inside `serial()`: one thread, except in the blocks that
ask for `parallel()`: the matmuls (`kernels.linear`) and attention over at least
`PARALLEL_MIN_KEYS` keys (two threads are even with one at 256 keys and 1.6x faster at 1024).
Measured with `python bench.py rollout --decode-threads all` against the default: the ratio to
transformers' generate improves by about 10% (1.72x to 1.95x with MKL matmuls, 2.12x to 2.36x with
oneDNN's). Outside `serial()` (prefill, training, evaluation forwards) nothing changes.

Departures and limits: the thread count is process-wide torch state, so another Python thread
running torch ops during a rollout runs them on one thread too. Nested `serial()` blocks are no-ops.
"""

import contextlib

import torch

# Attention over at least this many keys gets every thread inside serial() (measured above).
PARALLEL_MIN_KEYS = 256

SERIAL = True  # the one switch: False makes serial() a no-op (every op keeps every thread)
_threads = 0  # inside serial(): the thread count parallel() blocks get back; 0 outside


@contextlib.contextmanager
def serial():
    """Run the block on one torch thread, except its parallel() blocks; restore the count after."""
    global _threads
    n = torch.get_num_threads()
    if not SERIAL or _threads or n == 1:
        yield
        return
    _threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _threads = 0


@contextlib.contextmanager
def parallel(active: bool = True):
    """Inside serial(): run the block on every thread when `active`. Elsewhere: do nothing."""
    if not (active and _threads):
        yield
        return
    n = torch.get_num_threads()  # 1, or _threads in a nested parallel()
    torch.set_num_threads(_threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)
