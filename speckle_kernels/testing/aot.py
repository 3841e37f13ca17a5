"""Every Triton kernel specialization the launchers make, for compiling ahead of time without a
GPU (speckle_kernels/testing/aot_compile.py: sm_80 and sm_90, run by tests/test_aot_compile.py;
the register and spill report benchmarks/tools/triton_aot_report.py).

    variants(op) -> [(kernel, signature, constexprs)], op in OPS

The interpreter accepts code the compiler refuses (and the reverse), so CI compiles each one.
The lists follow the host code's choices: fp32/fp16/bf16 inputs, contiguous and channels_last
tiles (BLOCK_C x BLOCK_I = 1 x 2048 and 128 x 16: the shapes Br-U-Net's layers take), 32- and
64-bit indexing, every mode of every kernel.
"""
from __future__ import annotations

OPS = ("batch_renorm", "batch_renorm_act", "noise")
DTYPES = ("fp32", "fp16", "bf16")
I32, I64, F32 = "i32", "i64", "fp32"


def _tiles(channels_last: bool) -> dict:
    return dict(BLOCK_C=128, BLOCK_I=16) if channels_last else dict(BLOCK_C=1, BLOCK_I=2048)


def batch_renorm_variants():
    from speckle_kernels import batch_renorm_triton_kernels as k
    from speckle_kernels.triton_common import FINALIZE_BLOCK_C, FINALIZE_BLOCK_P

    variants = []
    for dtype in DTYPES:
        for channels_last in (False, True):
            for index_64 in (False, True):
                layout = dict(CHANNELS_LAST=channels_last, INDEX_64=index_64, **_tiles(channels_last))
                ints = dict(C=I32, INNER=I32, n_inner_blocks=I32, s_o=I64 if index_64 else I32,
                            s_i=I32, s_c=I32)
                for backward in (False, True):
                    sig = dict(x_ptr=f"*{dtype}", dy_ptr=f"*{dtype}", stats_ptr="*fp32", partial_ptr="*fp64",
                               **ints, n_tiles=I32, tiles_per_program=I32, BACKWARD="constexpr",
                               **{name: "constexpr" for name in layout})
                    variants.append((k.channel_sums_kernel, sig, dict(BACKWARD=backward, **layout)))
                for has_dy in (False, True):
                    sig = dict(x_ptr=f"*{dtype}", dy_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
                               pivot_ptr="*fp32", offset_ptr="*fp32", coef_x_ptr="*fp32",
                               coef_dy_ptr="*fp32", coef_0_ptr="*fp32", **ints, HAS_DY="constexpr",
                               **{name: "constexpr" for name in layout})
                    variants.append((k.per_channel_affine_kernel, sig, dict(HAS_DY=has_dy, **layout)))
    blocks = dict(BLOCK_C=FINALIZE_BLOCK_C, BLOCK_P=FINALIZE_BLOCK_P)
    for training in (False, True):
        for affine in (False, True):
            sig = dict(x_ptr="*fp32", partial_ptr="*fp64", weight_ptr="*fp32", bias_ptr="*fp32",
                       running_mean_ptr="*fp32", running_std_ptr="*fp32", num_batches_tracked_ptr="*i64",
                       stats_ptr="*fp32", P=I32, C=I32, s_c=I32, eps=F32, momentum=F32,
                       **{name: F32 for name in ("r_slope", "r_start", "r_low", "r_high",
                                                 "d_slope", "d_start", "d_low", "d_high")},
                       TRAINING="constexpr", HAS_WEIGHT="constexpr", HAS_BIAS="constexpr",
                       BLOCK_C="constexpr", BLOCK_P="constexpr")
            variants.append((k.forward_finalize_kernel, sig,
                             dict(TRAINING=training, HAS_WEIGHT=affine, HAS_BIAS=affine, **blocks)))
            sig = dict(partial_ptr="*fp64", weight_ptr="*fp32", stats_ptr="*fp32", grads_ptr="*fp32",
                       P=I32, C=I32, count=I32, TRAINING="constexpr", HAS_WEIGHT="constexpr",
                       BLOCK_C="constexpr", BLOCK_P="constexpr")
            variants.append((k.backward_finalize_kernel, sig, dict(TRAINING=training, HAS_WEIGHT=affine, **blocks)))
    return variants


def batch_renorm_act_variants():
    from speckle_kernels import batch_renorm_act_triton as b

    variants = []
    for dtype in DTYPES:
        for channels_last in (False, True):
            for index_64 in (False, True):
                sig = dict(x_ptr=f"*{dtype}", dy_ptr=f"*{dtype}", out_ptr=f"*{dtype}", stats_ptr="*fp32",
                           grads_ptr="*fp32", partial_ptr="*fp64", rng_ptr="*i64",
                           C=I32, L=I32, n_l_blocks=I32, n_tiles=I32, tiles_per_program=I32,
                           s_n=I64 if index_64 else I32, s_l=I32, s_c=I32, p=F32, keep_scale=F32, slope=F32,
                           **{name: "constexpr" for name in ("MODE", "DROPOUT", "QUADS", "CHANNELS_LAST",
                                                             "INDEX_64", "BLOCK_C", "BLOCK_I")})
                for mode in (b.MODE_FORWARD, b.MODE_SUMS, b.MODE_DX):
                    for dropout, quads in ((False, False), (True, False), (True, True)):
                        variants.append((b.batch_renorm_act_kernel, sig, dict(
                            MODE=mode, DROPOUT=dropout, QUADS=quads, CHANNELS_LAST=channels_last,
                            INDEX_64=index_64, **_tiles(channels_last))))
    return variants


def noise_variants():
    """Float inputs of add_speckle_noise and the uint8 -> fp32/bf16 path of make_noisy_batch,
    both distributions, per-image sigma on."""
    from speckle_kernels.noise_triton import speckle_kernel

    variants = []
    for in_ty, out_ty in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("u8", "fp32"), ("u8", "bf16")):
        for rayleigh in (False, True):
            signature = {"x_ptr": "*" + in_ty, "y_ptr": "*" + out_ty, "clean_ptr": "*" + out_ty,
                         "numel_img": I32, "seed": I64, "offset": I64, "factor": F32,
                         "sig_lo": F32, "sig_span": F32, "sigma_add": F32,
                         "BLOCK": "constexpr", "RAYLEIGH": "constexpr", "PER_IMAGE": "constexpr",
                         "CLIP": "constexpr", "FROM_U8": "constexpr"}
            constexprs = {"BLOCK": 1024, "RAYLEIGH": rayleigh, "PER_IMAGE": True, "CLIP": True,
                          "FROM_U8": in_ty == "u8"}
            variants.append((speckle_kernel, signature, constexprs))
    return variants


def variants(op: str):
    """The (kernel, signature, constexprs) list of `op` (one of OPS)."""
    table = {"batch_renorm": batch_renorm_variants, "batch_renorm_act": batch_renorm_act_variants,
             "noise": noise_variants}
    if op not in table:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return table[op]()
