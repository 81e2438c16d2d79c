"""Acquisition (CT-number) shift between domains.

The paper's problem: low-dose and full-dose scans are acquired differently, so the same
tissue has different CT numbers in the two domains. :class:`AcquisitionShift` maps the HU
of one acquisition to another, combining three effects:

1. Tube voltage (energy dependence of attenuation). HU is defined against water, so water
   (0 HU) and air (-1000 HU) are fixed at every kVp; materials whose attenuation falls
   faster with energy than water's (bone: calcium; iodine contrast) read higher at a lower
   kVp, fat reads lower. Modelled as a piecewise-linear map with knots at air (-1000 ->
   -1000), fat (-100 -> -100·fat_gain), water (0 -> 0) and bone (1000 -> 1000·bone_gain),
   extrapolated linearly above 1000 HU.
2. Calibration offset: a uniform HU offset (water not reading exactly 0). The ACR CT
   accreditation criterion for water is 0 ± 7 HU, so offsets of several HU occur between
   well-calibrated scanners.
3. Reconstruction kernel: a smoother kernel, modelled as a Gaussian blur of ``kernel_sigma``
   pixels (0: none).

Source of the tube-voltage numbers (:data:`KVP_120_TO_80`, :data:`KVP_120_TO_100`): HU of
a material = 1000·(μ/μ_water − 1) at the effective energy of the beam (about 60 keV for
120 kVp, about 50 keV for 80 kVp), with mass attenuation coefficients from the NIST XCOM /
ICRU Report 44 tables: water 0.2059 / 0.2269 cm²/g at 60 / 50 keV; cortical bone
(ρ = 1.92 g/cm³) 0.3148 / 0.4242 cm²/g. That gives cortical bone ≈ 1935 HU at 60 keV and
≈ 2590 HU at 50 keV, a gain of ≈ 1.34 for 120 -> 80 kVp; 100 kVp sits about half-way
(≈ 1.15). For fat (adipose, ρ ≈ 0.95) the tables give about −100 HU at 120 kVp and −110 to
−120 HU at 80 kVp (gain ≈ 1.1). These are rounded textbook-level values, not a scanner
calibration: the point is a realistic *kind* and *size* of shift, not one scanner.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AcquisitionShift:
    """HU map of a different acquisition; see the module docstring for the model.

    ``bone_gain``: HU multiplier at +1000 HU (and above). ``fat_gain``: multiplier at
    -100 HU. ``offset_hu``: added everywhere except air. ``kernel_sigma``: Gaussian blur in
    pixels (smoother reconstruction kernel).
    """

    bone_gain: float = 1.0
    fat_gain: float = 1.0
    offset_hu: float = 0.0
    kernel_sigma: float = 0.0

    def __call__(self, hu):
        """Apply to ``hu``: NumPy ``[..., H, W]`` (float) in HU; returns float32 (or the
        input float dtype) of the same shape."""
        from scipy.ndimage import gaussian_filter  # ~0.2 s that importing pdml.data spares

        x = np.asarray(hu)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        x = x.astype(np.float64)
        knots_in = np.array([-1000.0, -100.0, 0.0, 1000.0])
        knots_out = np.array([-1000.0, -100.0 * self.fat_gain, 0.0, 1000.0 * self.bone_gain])
        y = np.interp(x, knots_in, knots_out)
        above = x > 1000.0
        y[above] = x[above] * self.bone_gain
        below = x < -1000.0
        y[below] = x[below]
        # The offset fades out towards air: air reads -1000 on any calibrated scanner.
        weight = np.clip((x + 1000.0) / 900.0, 0.0, 1.0)
        y = y + self.offset_hu * weight
        if self.kernel_sigma > 0:
            sigma = [0.0] * (y.ndim - 2) + [self.kernel_sigma] * 2
            y = gaussian_filter(y, sigma=sigma, mode="nearest")
        return y.astype(dtype)


KVP_120_TO_100 = AcquisitionShift(bone_gain=1.15, fat_gain=1.05)
"""120 kVp -> 100 kVp (see the module docstring for the numbers)."""

KVP_120_TO_80 = AcquisitionShift(bone_gain=1.34, fat_gain=1.10)
"""120 kVp -> 80 kVp (see the module docstring for the numbers)."""

BUILTIN_ND_SHIFT = AcquisitionShift(bone_gain=1.15, fat_gain=1.05, offset_hu=20.0,
                                    kernel_sigma=0.0)
"""The built-in dataset's full-dose domain relative to its low-dose domain: a 100 kVp
style energy change plus a +20 HU calibration offset (about three times the ACR water
tolerance, so the domain gap is clearly measurable by :func:`pdml.metrics.hu_shift`)."""
