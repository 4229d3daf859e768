"""Plant the classic bugs of the LAWA history one at a time and report which the tests miss.

Each mutant is one exact edit (original text -> mutated text) of one file, with the
test selection that must catch it. The edits are made in a temporary copy of the
repository, one at a time, and the selection runs there under pytest with ``-x`` and a
time limit; the table at the end says, per mutant, whether a test failed (caught),
none did (survived), the run hung (timeout) or pytest could not run it (error).
Mutants of the CUDA kernels need a GPU and are skipped without one. Before the
mutants, the list is checked (:func:`problems`: an original text no longer in its file
exactly once stops the run with a non-zero exit, so the list cannot rot silently) and
every selection runs once on the unchanged copy, which must pass.

Run it before finishing any change to the kernels or the history::

    python -m tools.mutants                 # every mutant (about 5 minutes on 2 cores)
    python -m tools.mutants --only slot-index-reference count-c
    python -m tools.mutants --list

``tests/test_mutants.py`` checks in CI that every original text is still present.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.stages import run_group
from lawa_optim._cli import Parser, positive_float

ROOT = Path(__file__).resolve().parents[1]
#: Seconds one mutant's tests may run before the run counts as hung.
TIMEOUT_S = 300
_IGNORED = (".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", ".benchmarks", "build", "dist", "*.egg-info")


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``original`` replaced by ``mutated`` in ``path``; ``tests`` are the
    pytest arguments (files, node ids, ``-k`` expressions) that must catch it."""

    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    gpu: bool = False


def c_macro(*lines: str) -> str:
    """Lines of a multi-line C macro as ``csrc/cpu_kernels.c`` writes them: each padded to
    column 92 and continued with a backslash."""
    return "".join(line.ljust(92) + "\\\n" for line in lines)


REF = "lawa_optim/backends/reference.py"
C, CPY = "csrc/cpu_kernels.c", "lawa_optim/backends/cpu_kernels.py"
TRI, TRK = "lawa_optim/backends/triton.py", "lawa_optim/backends/triton_kernels.py"
CU, HIST = "csrc/lawa_kernels.cu", "lawa_optim/history.py"
CU8 = "csrc/lawa_int8.cu"
PLAIN = ("tests/test_ops.py", "-k", "torch-plain")
FUSED = ("tests/test_ops.py", "-k", "torch-fused")
TRITON = ("tests/test_ops.py", "-k", "triton")
CUDA = ("tests/test_ops.py", "-k", "cuda")
MOVED = ("tests/test_history.py", "-k", "moved_storage")


def narrowed(tests: tuple[str, ...], cases: str) -> tuple[str, ...]:
    """``tests`` narrowed to the test functions matching ``cases``: with ``-x`` a mutant
    caught by the last function of a file would otherwise wait for all the others."""
    return (*tests[:-1], f"{tests[-1]} and {cases}")


_SLOT_WRITE = ("                {",
               "                    H##_t *restrict slot = ring + s * D;",
               "                    for (int64_t i = b; i < e; i++) slot[i] = cast_##P##_##H(src[i]);",
               "                }")
_SLOT_SUM = ("                for (int64_t i = b; i < e; i++) total[i] = comp[i - b] = 0.0f;",
             "                for (int64_t j = 0; j < filled; j++) {",
             "                    const H##_t *restrict r = ring + j * D;",
             "                    for (int64_t i = b; i < e; i++) csum_add(&total[i], &comp[i - b], H##_to_f(r[i]));",
             "                }",
             "                for (int64_t i = b; i < e; i++) {",
             "                    comp[i - b] = csum_result(total[i], comp[i - b]);",
             "                    total[i] = comp[i - b] / count;",
             "                }",
             "                for (int64_t i = b; i < e; i++)",
             "                    if (!isfinite(comp[i - b])) total[i] = wide_##H(ring + i, D, k, 0, 0, filled);")

MUTANTS = [
    # -- the torch backend's plain code -------------------------------------------------
    Mutant("slot-index-reference", REF, "    s = n % b.k\n", "    s = (n + 1) % b.k\n", PLAIN),
    Mutant("subtract-old-reference", REF,
           "delta.neg_().add_(slot[lo:hi])", "delta.zero_().add_(slot[lo:hi])", PLAIN),
    Mutant("count-reference", REF, "count = _scalar(n + 1, b)", "count = _scalar(b.k, b)", PLAIN),
    Mutant("backup-skipped-reference", REF,
           "    torch._foreach_copy_(b.views(b.backup), b.params)\n", "", PLAIN),
    Mutant("push-updates-only-the-last-chunk-reference", REF,
           "new - old\n        b.total[lo:hi].add_(delta.div_(k))\n", "new - old\n    b.total[lo:hi].add_(delta.div_(k))\n",
           PLAIN),
    Mutant("swap-in-chunk-base-reference", REF, "b.view(avg, i, base=lo)", "b.view(avg, i)", PLAIN),
    Mutant("refresh-period-ignored-reference", REF,
           "refresh = (n + 1) % b.refresh_every == 0", "refresh = (n + 1) % b.k == 0", narrowed(PLAIN, "refresh")),
    Mutant("refresh-reads-the-old-slot-reference", REF,
           "        torch._foreach_copy_(views, params)\n        _mean_slots(b, min(n + 1, b.k))\n",
           "        _mean_slots(b, min(n + 1, b.k))\n        torch._foreach_copy_(views, params)\n", PLAIN),
    Mutant("last-j-oldest-first-reference", REF,
           "b.ring[(n - 1 - i) % b.k, lo:hi]", "b.ring[(n - last + i) % b.k, lo:hi]", PLAIN),
    Mutant("decay-swapped-reference", REF,
           "    torch._foreach_mul_(views, decay)\n    torch._foreach_add_(views, params, alpha=1.0 - decay)\n",
           "    torch._foreach_mul_(views, 1.0 - decay)\n    torch._foreach_add_(views, params, alpha=decay)\n",
           narrowed(PLAIN, "ema")),
    Mutant("ema-first-update-folds-reference", REF,
           "    if n == 0:\n        torch._foreach_copy_(views, params)",
           "    if n < 0:\n        torch._foreach_copy_(views, params)", narrowed(PLAIN, "ema")),
    Mutant("weighted-uncompensated-reference", REF, "    return s + c\n", "    return s\n",
           narrowed(PLAIN, "weighted")),
    Mutant("weighted-oldest-first-reference", REF,
           "b.ring[(n - 1 - j) % b.k, lo:hi]", "b.ring[(n - len(weights) + j) % b.k, lo:hi]", narrowed(PLAIN, "weighted")),
    Mutant("recompute-keeps-the-old-sum-reference", REF,
           "    s, c = torch.zeros_like(like), torch.zeros_like(like)\n",
           "    s, c = like.clone(), torch.zeros_like(like)\n", PLAIN),
    Mutant("sum-uncompensated-reference", REF,
           "    return torch.where(s.isfinite(), s + c, s)\n", "    return s\n", PLAIN),
    Mutant("overflow-fallback-skipped-reference", REF,
           "    if not bool(bad.any()):\n        return avg\n", "    if True:\n        return avg\n",
           narrowed(PLAIN, "beyond")),
    Mutant("int8-slot-index-reference", REF, "    s = (n - 1) % (b.k - 1)\n", "    s = n % (b.k - 1)\n",
           narrowed(PLAIN, "int8")),
    Mutant("int8-open-loop-anchor-reference", REF,
           "torch.where(moved, anchor + dq, anchor)", "torch.where(moved, w, anchor)", narrowed(PLAIN, "int8")),
    Mutant("int8-scale-reference", REF,
           "torch.div(m, torch.full_like(m, 127.0))", "torch.div(m, torch.full_like(m, 128.0))", narrowed(PLAIN, "int8")),
    Mutant("int8-block-base-reference", REF,
           "b.scales[s, b.block_bases[i]:b.block_bases[i] + nb] = scale", "b.scales[s, :nb] = scale",
           narrowed(PLAIN, "int8")),
    Mutant("int8-swap-oldest-first-reference", REF,
           "slots = [(n - 1 - i) % (b.k - 1) for i", "slots = [(n - coefficients.numel() + i) % (b.k - 1) for i",
           narrowed(PLAIN, "int8")),
    # -- the fused CPU kernels ----------------------------------------------------------
    Mutant("slot-index-c", C, "D, k, n % k, filled, mode,", "D, k, (n + 1) % k, filled, mode,", FUSED),
    Mutant("subtract-old-c", C,
           "float d = (H##_to_f(nw) - H##_to_f(slot[i])) / count;", "float d = H##_to_f(nw) / count;", FUSED),
    Mutant("count-c", CPY, "mode, count = SWAP_MEAN, min(n, b.k)", "mode, count = SWAP_MEAN, b.k", FUSED),
    Mutant("backup-skipped-c", C,
           "copy_streaming(backup_, param_, (size_t)n * sizeof(P##_t));", "(void)backup_;", FUSED),
    Mutant("row-base-c", CPY,
           "(addr + lo * size, off + lo, min(ROW, n - lo))", "(addr + lo * size, off, min(ROW, n - lo))", FUSED),
    Mutant("last-j-block-base-c", C,
           "ring + ((pushes - 1 - j) % k) * D + b;", "ring + ((pushes - 1 - j) % k) * D;", FUSED),
    Mutant("int8-slot-index-c", C, "int64_t s = first ? 0 : (n - 1) % (k - 1);", "int64_t s = first ? 0 : n % (k - 1);",
           narrowed(FUSED, "int8")),
    Mutant("int8-open-loop-anchor-c", C,
           "anchor[b + i] = anchor[b + i] + q * scale;", "anchor[b + i] = P##_to_f(src[b + i]);", narrowed(FUSED, "int8")),
    Mutant("int8-scale-c", C, "float scale = mx / 127.0f,", "float scale = mx / 128.0f,", narrowed(FUSED, "int8")),
    Mutant("int8-block-base-c", CPY, "base + lo // QBLOCK) for lo", "lo // QBLOCK) for lo", narrowed(FUSED, "int8")),
    Mutant("int8-swap-slot-c", C, "int64_t slot = (pushes - 1 - j) % (k - 1);", "int64_t slot = (pushes - j) % (k - 1);",
           narrowed(FUSED, "int8")),
    Mutant("bfloat16-round-half-up-c", C,
           "u += 0x7fffu + ((u >> 16) & 1u);", "u += 0x8000u;", ("tests/test_cpu_kernels.py",)),
    Mutant("bfloat16-truncated-c", C, "u += 0x7fffu + ((u >> 16) & 1u);", "u += 0u;", FUSED),
    Mutant("refresh-period-ignored-c", C,
           "int mode = (n + 1) % refresh_every == 0 ? 2 : n >= k;", "int mode = (n + 1) % k == 0 ? 2 : n >= k;",
           narrowed(FUSED, "refresh")),
    Mutant("refresh-reads-the-old-slot-c", C,
           c_macro(*_SLOT_WRITE, *_SLOT_SUM), c_macro(*_SLOT_SUM, *_SLOT_WRITE), FUSED),
    Mutant("sum-uncompensated-c", C,
           "static inline float csum_result(float s, float c) { return isfinite(s) ? s + c : s; }",
           "static inline float csum_result(float s, float c) { return (void)c, s; }", FUSED),
    Mutant("overflow-fallback-skipped-c", C, "                if (!isfinite(total[i]))", "                if (0)",
           narrowed(FUSED, "beyond")),
    Mutant("last-j-oldest-first-c", C,
           "ring + ((pushes - 1 - j) % k) * D + b;", "ring + ((pushes - count + j) % k) * D + b;", FUSED),
    Mutant("weighted-uncompensated-c", C, "avg_f32_##P(sum[i] + comp[i])", "avg_f32_##P(sum[i])",
           narrowed(FUSED, "weighted")),
    Mutant("weighted-block-base-c", C, "ring + slot * D + b;", "ring + slot * D;", narrowed(FUSED, "weighted")),
    Mutant("decay-swapped-c", C,
           "float d = (float)decay, a = (float)(1.0 - decay);", "float d = (float)(1.0 - decay), a = (float)decay;",
           narrowed(FUSED, "ema")),
    Mutant("ema-first-update-folds-c", CPY,
           "b.total.data_ptr(), int(n == 0),", "b.total.data_ptr(), int(n < 0),", narrowed(FUSED, "ema")),
    # -- Triton (the interpreter without a GPU) -----------------------------------------
    Mutant("slot-index-triton", TRK, "    s = n % K\n", "    s = (n + 1) % K\n", TRITON),
    Mutant("subtract-old-triton", TRK,
           "t = mean + tl.math.div_rn(_to_f32(new) - old, count)",
           "t = mean + tl.math.div_rn(_to_f32(new), count)", TRITON),
    Mutant("count-triton", TRK,
           "count = tl.zeros(idx.shape, tl.float32) + filled", "count = tl.zeros(idx.shape, tl.float32) + K", TRITON),
    Mutant("backup-skipped-triton", TRK, "    tl.store(backup + idx, p, mask=mask)\n", "", TRITON),
    Mutant("table-row-base-triton", TRI,
           "flat = torch.tensor(offsets, dtype=torch.int64)[param] + start",
           "flat = torch.tensor(offsets, dtype=torch.int64)[param]", TRITON),
    Mutant("bfloat16-round-half-up-triton", TRK,
           "rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16", "rounded = (bits + 0x8000) >> 16",
           ("tests/test_triton.py", "-k", "casts")),
    Mutant("bfloat16-truncated-triton", TRK,
           "rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16", "rounded = bits >> 16", TRITON),
    Mutant("refresh-period-ignored-triton", TRK,
           "    refresh = (n + 1) % R == 0", "    refresh = (n + 1) % K == 0", narrowed(TRITON, "refresh")),
    Mutant("refresh-reads-the-old-slot-triton", TRK,
           "            if j == s:\n                x = _to_f32(new)\n            else:\n"
           "                x = _to_f32(tl.load(row + idx, mask=mask))\n",
           "            x = _to_f32(tl.load(row + idx, mask=mask))\n", TRITON),
    Mutant("weighted-oldest-first-triton", TRK,
           "slot = (n - 1 - j) % K", "slot = (n - last + j) % K", narrowed(TRITON, "weighted")),
    Mutant("last-j-oldest-first-triton", TRK,
           "x = _to_f32(tl.load(ring + ((n - 1 - i) % K) * D + off + idx, mask=mask))",
           "x = _to_f32(tl.load(ring + ((n - last + i) % K) * D + off + idx, mask=mask))", TRITON),
    Mutant("sum-uncompensated-triton", TRK, "    return tl.where(_finite(s), s + c, s)\n", "    return s\n", TRITON),
    Mutant("overflow-fallback-skipped-triton", TRK,
           "    bad = ~_finite(total)\n    if tl.max(bad.to(tl.int32), axis=0) > 0:",
           "    bad = ~_finite(total)\n    if tl.max(bad.to(tl.int32), axis=0) < 0:",
           narrowed(TRITON, "beyond")),
    Mutant("decay-swapped-triton", TRI,
           "_f32(decay), _f32(1.0 - decay))", "_f32(1.0 - decay), _f32(decay))", narrowed(TRITON, "ema")),
    Mutant("ema-first-update-folds-triton", TRK,
           "first = tl.load(pushes) == 0", "first = tl.load(pushes) < 0", narrowed(TRITON, "ema")),
    Mutant("int8-slot-index-triton", TRK, "(n - 1) % tl.maximum(K - 1, 1))", "n % tl.maximum(K - 1, 1))",
           narrowed(TRITON, "int8")),
    Mutant("int8-open-loop-anchor-triton", TRK,
           "tl.where(live[:, None], a + q * scale[:, None], a)", "tl.where(live[:, None], w, a)", narrowed(TRITON, "int8")),
    Mutant("int8-scale-triton", TRK, "tl.math.div_rn(m, tl.zeros_like(m) + 127.0)", "tl.math.div_rn(m, tl.zeros_like(m) + 128.0)",
           narrowed(TRITON, "int8")),
    Mutant("int8-block-base-triton", TRI, "first = torch.tensor(b.block_bases, dtype=torch.int64)[param] + ",
           "first = 0 * torch.tensor(b.block_bases, dtype=torch.int64)[param] + ", narrowed(TRITON, "int8")),
    # -- CUDA (a GPU only) --------------------------------------------------------------
    Mutant("slot-index-cuda", CU, "    v.s = n % k;\n", "    v.s = (n + 1) % k;\n", CUDA, gpu=True),
    Mutant("sum-uncompensated-cuda", CU, "  return isfinite(s) ? __fadd_rn(s, c) : s;", "  return (void)c, s;", CUDA,
           gpu=True),
    Mutant("count-cuda", CU,
           "const float count = float(v.filled);", "const float count = float(k);", CUDA, gpu=True),
    Mutant("weighted-newest-slot-cuda", CU, "    v.newest = (n - 1) % k;\n", "    v.newest = n % k;\n", CUDA, gpu=True),
    Mutant("int8-slot-index-cuda", CU8, "const int64_t s = first ? 0 : (n - 1) % (k - 1);",
           "const int64_t s = first ? 0 : n % (k - 1);", narrowed(CUDA, "int8"), gpu=True),
    Mutant("int8-open-loop-anchor-cuda", CU8, "av[j] = __fadd_rn(av[j], __fmul_rn(q, scale));",
           "av[j] = LawaElem<P>::to_float(p[j]);", narrowed(CUDA, "int8"), gpu=True),
    # -- the history, the wrapper, checkpoints, torch.compile ---------------------------
    Mutant("swap-in-misses-moved-storage", HIST,
           "        for b, _ in held:\n            b.check_params()\n", "", MOVED),
    Mutant("swap-back-misses-moved-storage", HIST,
           "        for b in swapped:\n            b.check_params()  # fused backends write through cached addresses\n",
           "", MOVED),
    Mutant("load-aliases-the-loaded-dict", "lawa_optim/state.py",
           "        return value.clone()\n", "        return value\n", ("tests/test_state_dict.py", "-k", "independent")),
    Mutant("load-of-0.1.0-keeps-no-sum", "lawa_optim/state.py",
           "                History.recompute(b)  # a 0.1.0 or 0.2.0", "                pass  # a 0.1.0 or 0.2.0",
           ("tests/test_state_dict.py", "-k", "right_after_loading")),
    Mutant("load-backs-up-every-bucket", "lawa_optim/state.py",
           'if any("lawa_backup" in checked.tensors[id(p)] for p in b.sources):', "if True:",
           ("tests/test_state_dict.py", "-k", "without_snapshot")),
    Mutant("load-forgets-start", "lawa_optim/state.py",
           "    run.started = run.steps >= opt.start", "    run.started = opt.start == 0",
           ("tests/test_state_dict.py", "-k", "follows_start")),
    Mutant("load-trusts-the-wrapped-optimizers-part", "lawa_optim/state.py",
           "    check_optimizer(opt._inner, opt.param_groups, sd)\n", "",
           ("tests/test_state_dict.py", "-k", "wrapped_optimizers_part")),
    Mutant("load-one-id-for-two-parameters", "lawa_optim/state_check.py", "    _check_ids(opt, groups)\n", "",
           ("tests/test_state_dict.py", "-k", "one-id")),
    Mutant("load-by-position-whatever-the-names", "lawa_optim/wrapper.py",
           "        state_dict = match_names(self.param_groups, state_dict)\n", "",
           ("tests/test_state_dict.py", "-k", "names")),
    Mutant("counters-up-to-int64-max", "lawa_optim/state_check.py", "MAX_COUNT = 2**62", "MAX_COUNT = 2**63 - 1",
           ("tests/test_state_dict.py", "-k", "refused_and_changes_nothing")),
    Mutant("start-ignored", "lawa_optim/wrapper.py",
           "run.started = run.steps >= self.start", "run.started = True", ("tests/test_wrapper.py",)),
    Mutant("refresh-off-by-default", HIST,
           "self.refresh_every = k if refresh_every is None else refresh_every",
           "self.refresh_every = 2**62 if refresh_every is None else refresh_every", ("tests/test_guarantee.py",)),
    Mutant("count-is-every-push", HIST,
           'return n if self.mode == "ema" else min(n, self.k)', "return n", ("tests/test_wrapper.py",)),
    Mutant("custom-op-hides-a-mutation", "lawa_optim/compiled.py",
           # the schema too: torch refuses mutates_args that disagree with it at import
           'mutates_args=("ring", "total", "pushes", "scales"),\n    schema=(\n'
           '        "(Tensor[] params, Tensor(a1!)? ring, Tensor(a2!) total, Tensor(a3!) pushes,',
           'mutates_args=("ring", "total", "scales"),\n    schema=(\n'
           '        "(Tensor[] params, Tensor(a1!)? ring, Tensor(a2!) total, Tensor pushes,',
           ("tests/test_compile.py", "-k", "opcheck")),
    # -- parameters that share memory, changes to parameters, swaps, integrations -------
    Mutant("alias-gets-a-slice-of-its-own", HIST,
           'enumerate(group["params"]) if owners[g][i] == (g, i)\n', 'enumerate(group["params"])\n',
           ("tests/test_alias.py", "-k", "written_once")),
    Mutant("overlapping-memory-accepted", HIST,
           "if (start, end, t.dtype, t.shape, t.stride()) != (reach[1], reach[2], u.dtype, u.shape, u.stride()):",
           "if False:", ("tests/test_alias.py", "-k", "overlapping")),
    Mutant("one-memory-two-tensors-not-aliased", HIST,
           "        owners[g][i] = owners[h][j]\n    return owners", "    return owners",
           ("tests/test_alias.py", "-k", "written_once")),
    Mutant("sharing-unchecked-after-a-move", HIST,
           "        if self.sharing is not None:\n            self.sharing.check()\n", "",
           ("tests/test_alias.py", "-k", "move or moved")),
    Mutant("shape-not-compared", HIST,
           "and p.shape == self._shapes[i]", "and p.numel() == self.numels[i]",
           ("tests/test_history.py", "-k", "shape_change")),
    Mutant("memory-format-followed", HIST,
           "                and p.stride() == self._strides[i]\n", "",
           ("tests/test_history.py", "-k", "memory_format")),
    Mutant("float8-accepted", HIST,
           "    if p.dtype not in FLOAT_DTYPES:\n", "    if not p.dtype.is_floating_point:\n",
           ("tests/test_wrapper.py", "-k", "floating_dtype")),
    Mutant("restore-forgets-weights-changed-inside", HIST,
           "            torch._foreach_copy_(b.views(plan), b.params)\n", "",
           ("tests/test_wrapper.py", "-k", "changed_inside")),
    Mutant("start-exclusive", "lawa_optim/wrapper.py",
           "run.started = run.steps >= self.start", "run.started = run.steps > self.start",
           ("tests/test_wrapper.py", "-k", "exactly_at")),
    Mutant("concurrent-swaps-let-through", "lawa_optim/wrapper.py",
           "        if not lock.acquire(blocking=False):\n", "        if not (lock.acquire(blocking=False) or True):\n",
           ("tests/test_wrapper.py", "-k", "another_thread")),
    Mutant("names-compared-by-length", "lawa_optim/integrations/_common.py",
           "if live is not None and saved != live:", "if live is not None and len(saved) != len(live):",
           ("tests/test_lightning.py", "-k", "equal_length")),
    Mutant("two-callbacks-blame-configure-optimizers", "lawa_optim/integrations/lightning.py",
           "        if len(mine) > 1:\n", "        if len(mine) > 2:\n", ("tests/test_lightning.py", "-k", "two_callbacks")),
    # -- the in-place swap (exchange with the running mean) --------------------------------
    Mutant("exchange-keeps-the-wrong-half-reference", REF,
           "        kept = (weights << 16) | low\n", "        kept = (weights << 16) | (word >> 16)\n", PLAIN),
    Mutant("exchange-rounding-not-undone-reference", REF,
           "- (low >> 15)) & 0xFFFF", ") & 0xFFFF", PLAIN),
    Mutant("exchange-skipped-on-swap-back-reference", REF,
           "    if b.backup is None:\n        exchange(b, back=True)\n        return\n",
           "    if b.backup is None:\n        return\n", PLAIN),
    Mutant("exchange-keeps-the-wrong-half-c", C,
           "total[i] = (w << 16) | (m & 0xffffu);", "total[i] = (w << 16) | (m >> 16);", FUSED),
    Mutant("exchange-rounding-not-undone-c", C,
           "((uint32_t)param[i] - (low >> 15)) & 0xffffu", "(uint32_t)param[i]", FUSED),
    Mutant("bfloat16-average-ties-to-even-c", C,
           "    return (bf16_t)((u + 0x8000u) >> 16);\n", "    return f_to_bf16(x, 0xffffu);\n", FUSED),
    Mutant("exchange-keeps-the-wrong-half-triton", TRK,
           "            kept = (param << 16) | low\n", "            kept = (param << 16) | (word >> 16)\n", TRITON),
    Mutant("exchange-keeps-the-wrong-half-cuda", CU,
           ": (w << 16) | low);", ": (w << 16) | (word >> 16));", CUDA, gpu=True),
    Mutant("mean-step-not-divided-cuda", CU,
           "t.v[j] = __fadd_rn(t.v[j], __fdiv_rn(diff, count));", "t.v[j] = __fadd_rn(t.v[j], diff);", CUDA, gpu=True),
    Mutant("refresh-not-divided-c", C,
           "                    total[i] = comp[i - b] / count;", "                    total[i] = comp[i - b];", FUSED),
    Mutant("in-place-despite-a-mean-that-is-not-finite", HIST,
           "ops.exchanges(b) and _finite(b.total)", "ops.exchanges(b)",
           ("tests/test_swap.py", "-k", "not_finite and not resident")),
    Mutant("write-while-swapped-unseen", HIST,
           "written = b.exchanged is not None and any(", "written = False and any(",
           ("tests/test_swap.py", "-k", "write_while")),
    Mutant("failed-swap-not-rolled-back", HIST,
           "            for b in done:\n                self._unswap(b)\n", "",
           ("tests/test_swap.py", "-k", "fails_to_swap")),
    Mutant("in-place-for-last-j", HIST,
           "full = last is None and weights is None and fitted is None",
           "full = weights is None and fitted is None",
           ("tests/test_wrapper.py", "-k", "newest_snapshots")),
    Mutant("newest-slot-not-compared", HIST,
           "            if not torch.equal(flat[lo:lo + COMPARE_PIECE], kept[lo:lo + COMPARE_PIECE]):",
           "            if False:", ("tests/test_swap.py", "-k", "newest_slot_is_the_backup and not triton")),
    Mutant("saved-while-swapped-holds-the-words", "lawa_optim/state.py",
           "            mean, backup = unexchanged(b.params[i], mean)\n", "            pass\n",
           ("tests/test_swap.py", "-k", "saved_while_swapped")),
    Mutant("unbalanced-cc-raises", "lawa_optim/backends/native.py",
           "    except ValueError as exc:  # an unbalanced quote", "    except OSError as exc:  # an unbalanced quote",
           ("tests/test_native.py", "-k", "does_not_split")),
    # -- post-hoc EMA (mode="phema") ---------------------------------------------------
    Mutant("phema-one-row-reference", REF, "            row = b.emas[e, lo:hi]\n", "            row = b.emas[0, lo:hi]\n",
           narrowed(PLAIN, "phema")),
    Mutant("phema-first-step-folds-reference", REF, "            if a == 1.0:\n                row.copy_(theta)",
           "            if a == 2.0:\n                row.copy_(theta)", narrowed(PLAIN, "phema")),
    Mutant("phema-fma-c", C, "ema[i] = ema[i] + a * (theta[i] - ema[i]);", "ema[i] = fmaf(a, theta[i] - ema[i], ema[i]);",
           narrowed(FUSED, "phema")),
    Mutant("phema-one-row-c", C, "float *restrict ema = emas + e * D + b;", "float *restrict ema = emas + b;",
           narrowed(FUSED, "phema")),
    Mutant("phema-first-step-folds-c", C, "if (a == 1.0f) {", "if (a == 2.0f) {", narrowed(FUSED, "phema")),
    Mutant("phema-row-step-triton", TRK, "        row += D  # a 64-bit pointer step: e * D may exceed 2**31\n",
           "", narrowed(TRITON, "phema")),
    Mutant("phema-slot-width-unrecorded", "lawa_optim/posthoc.py", "b.slots[s] = (b.steps, e)", "b.slots[s] = (b.steps, 0)",
           ("tests/test_phema_mode.py",)),
    Mutant("phema-fit-oldest-first", "lawa_optim/posthoc.py", "t, e = slots[(n - 1 - j) % k]",
           "t, e = slots[(n - min(n, k) + j) % k]", ("tests/test_phema_mode.py",)),
    Mutant("phema-saved-slots-unchecked", "lawa_optim/posthoc.py", "        _check_slots(g, k, E, t, slots, pushes[gen])\n",
           "", ("tests/test_state_dict.py", "-k", "phema")),
    Mutant("phema-refusal-after-the-swap", "lawa_optim/wrapper.py",
           "            fitted, fit = posthoc.fit(self._history, sigma_rel, self.max_fit_error)\n"
           "        self._history.check_groups(self.param_groups)\n"
           "        compiled.warn_if_frozen()\n"
           "        self._history.swap_in(last, weights, fitted, backup)\n"
           "        self._run.swapped = True\n",
           "            fitted, fit = posthoc.fit(self._history, sigma_rel, float('inf'))\n"
           "        self._history.check_groups(self.param_groups)\n"
           "        compiled.warn_if_frozen()\n"
           "        self._history.swap_in(last, weights, fitted, backup)\n"
           "        self._run.swapped = True\n"
           "        if sigma_rel is not None:\n"
           "            posthoc.fit(self._history, sigma_rel, self.max_fit_error)\n",
           ("tests/test_phema_mode.py", "-k", "refused")),
    # TWA over an 8-bit history: the stored snapshots it trains over, rebuilt newest first.
    Mutant("twa-int8-delta-slot", REF, "delta = dequantised(b, (n - 1 - j) % (b.k - 1), i)",
           "delta = dequantised(b, (n - j) % (b.k - 1), i)", ("tests/test_twa.py", "-k", "int8")),
    Mutant("twa-int8-delta-added", REF, "torch.sub(rows[j - 1], delta, out=rows[j])",
           "torch.add(rows[j - 1], delta, out=rows[j])", ("tests/test_twa.py", "-k", "int8")),
    Mutant("twa-nonfinite-unchecked", "lawa_optim/twa.py",
           "bad = [j for j in range(n) if not bool(rows[j].isfinite().all())]", "bad = []",
           ("tests/test_twa.py", "-k", "finite")),
    # The 8-bit history under FSDP2: rows of 256 elements keep 8 bits, their scales saved by row.
    Mutant("fsdp8-fallback-kept-8bit", "lawa_optim/history.py", "    if not row_blocks(p.shape):\n        return None\n",
           "", ("tests/test_distributed.py", "-k", "8bit")),
    Mutant("fsdp8-scales-unshifted", "lawa_optim/state.py",
           'entry["lawa_scales"] = as_global(b.saved_scales(i), p, lead=scales[0], shape=scales[1:])',
           'entry["lawa_scales"] = as_global(b.saved_scales(i).flatten(1), p, lead=scales[0], shape=(scales[1] * scales[2],))',
           ("tests/test_distributed.py", "-k", "8bit")),
    # Triton: the host's alignment decision, the one thing the interpreter cannot see.
    Mutant("triton-aligned-all-always", "lawa_optim/backends/triton.py", "bool((table[:, 0] % 16 == 0).all())", "True",
           ("tests/test_triton.py", "-k", "alignment_is_declared")),
]


def problems(root: Path = ROOT, mutants: list[Mutant] = MUTANTS) -> list[str]:
    """What keeps the list from running as written: an original text not in its file
    exactly once, an edit that changes nothing, a repeated name, a missing test file."""
    out = []
    names = [m.name for m in mutants]
    out += [f"{n}: the name is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        path = root / m.path
        count = path.read_text().count(m.original) if path.is_file() else 0
        if count != 1:
            out.append(f"{m.name}: its original text is in {m.path} {count} times, not once")
        if m.mutated == m.original:
            out.append(f"{m.name}: the edit changes nothing")
        files = [t.split("::")[0] for t in m.tests if t.startswith("tests/")]
        out += [f"{m.name}: no test file {f}" for f in files if not (root / f).is_file()]
    return out


def _pytest(copy: Path, tests: tuple[str, ...], env: dict[str, str], timeout: float) -> tuple[str, float, str]:
    """(``caught``, ``survived``, ``timeout`` or ``error``), seconds, and the first failing
    test (or the reason) for one run of ``tests`` in ``copy``."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    # A session of its own, so that a hung run is ended with every process it started.
    rc, out, err = run_group(cmd, timeout, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seconds = time.monotonic() - start
    if rc is None:
        return "timeout", seconds, f"no result in {timeout:.0f} s"
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    if rc == 0:
        return "survived", seconds, ""
    if rc == 1 and failed:
        return "caught", seconds, failed.group(1)
    tail = (out + err).strip().splitlines()[-1:] or [""]
    return "error", seconds, f"pytest exit {rc}: {tail[0][:120]}"


def run(mutants: list[Mutant], timeout: float = TIMEOUT_S) -> list[dict]:
    """Every mutant in a temporary copy of the repository; one result row each. Stops
    (``SystemExit``, a non-zero exit) before anything runs when :func:`problems` finds any."""
    broken = problems(ROOT, mutants)
    if broken:
        raise SystemExit("\n".join(f"error: {line}" for line in broken) + "\nfix the list of mutants first")
    import torch

    gpu = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lawa-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*_IGNORED))
        # No stale bytecode of a restored file, and no mutated native build in the user's cache.
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "LAWA_OPTIM_BUILD_DIR": str(Path(tmp) / "build")}
        runnable = [m for m in mutants if gpu or not m.gpu]
        for tests in dict.fromkeys(m.tests for m in runnable):
            status, seconds, detail = _pytest(copy, tests, env, timeout)
            if status != "survived":  # the unchanged code must pass
                raise SystemExit(f"{' '.join(tests)} fails without a mutant ({status}: {detail}): fix it first")
            print(f"unchanged: {' '.join(tests)} passes in {seconds:.0f} s", flush=True)
        for m in mutants:
            row = {"name": m.name, "path": m.path, "seconds": 0.0, "detail": ""}
            path = copy / m.path
            text = path.read_text()
            if m.gpu and not gpu:
                row["status"], row["detail"] = "skipped", "needs a CUDA GPU"
            else:
                path.write_text(text.replace(m.original, m.mutated))
                try:
                    row["status"], row["seconds"], row["detail"] = _pytest(copy, m.tests, env, timeout)
                finally:
                    path.write_text(text)
            print(f"{m.name}: {row['status']} {row['detail']}", flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    out = ["| mutant | file | result | s | first failing test, or why |", "|---|---|---|---|---|"]
    out += [f"| {r['name']} | {r['path']} | {r['status']} | {r['seconds']:.0f} | {r['detail']} |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m tools.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--timeout", type=positive_float, default=TIMEOUT_S, help=f"seconds per mutant (default {TIMEOUT_S})")
    args = parser.parse_args(argv)
    chosen = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"argument --only: no mutant named {', '.join(unknown)}; --list shows them")
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:48} {m.path:40} {' '.join(m.tests)}{'  (GPU)' if m.gpu else ''}")
        return 0
    rows = run(chosen, args.timeout)
    print(table(rows))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("caught", "survived", "timeout", "error", "skipped")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if counts["survived"] or counts["timeout"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
