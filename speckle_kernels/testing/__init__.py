"""The float64 case kits that judge every backend, shipped with the package (as torch ships
torch.testing): the tests, the benchmarks' setup checks and the GPU check all use them.

    batch_renorm       BatchRenorm: cases, steps, the float64 judge and its bounds
    batch_renorm_act   the norm block: the BatchRenorm kit plus activation and dropout mask
    noise              the speckle noise: fields, cases and bounds
    backends           the backends a kit runs on here, and why one cannot
"""
