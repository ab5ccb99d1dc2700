"""Clinical constants shared by the whole pipeline: HU windows, label codes, lobe codes.

Every number a radiologist would recognise lives here under a name, so that configs and code refer to the same value.
"""

from __future__ import annotations

# Lung window used by both papers (DA-CMIL and M2UNet): clip to [-1200, 0] HU, then scale to [0, 1].
HU_WINDOW_MIN: float = -1200.0
HU_WINDOW_MAX: float = 0.0

# Physical limits used to check that an image holds CT numbers at all.
HU_AIR: float = -1000.0
HU_WATER: float = 0.0
HU_PLAUSIBLE_MIN: float = -3100.0  # below the -3024 padding of some scanners means "not HU"
HU_PLAUSIBLE_MAX: float = 32767.0

# Scanners pad the area outside the reconstruction circle with these values; they are not air inside the patient.
HU_PADDING_VALUES: tuple[float, ...] = (-3024.0, -2048.0, -2000.0)

# Thresholds of the classical masks.
HU_BODY_THRESHOLD: float = -500.0  # tissue vs gas: fat is about -100 HU, lung parenchyma about -850 HU
HU_LUNG_THRESHOLD: float = -320.0  # aerated lung vs soft tissue (ground glass up to about -300 HU stays lung)

# Minimum in-plane size of the body crop (M2UNet: "the body image is at least 256 x 256 axially").
BODY_CROP_MIN_SIZE: int = 256

# Lung mask labels, in patient coordinates (patient's right, not the image's right).
LUNG_BACKGROUND: int = 0
LUNG_RIGHT: int = 1
LUNG_LEFT: int = 2
LUNG_LABELS: dict[str, int] = {"right": LUNG_RIGHT, "left": LUNG_LEFT}

# Lung lobe labels used by the project (M2UNet: background + 5 lobes = 6 classes).
LOBE_BACKGROUND: int = 0
LOBE_RIGHT_UPPER: int = 1
LOBE_RIGHT_MIDDLE: int = 2
LOBE_RIGHT_LOWER: int = 3
LOBE_LEFT_UPPER: int = 4
LOBE_LEFT_LOWER: int = 5
LOBE_NAMES: dict[int, str] = {
    LOBE_RIGHT_UPPER: "right_upper",
    LOBE_RIGHT_MIDDLE: "right_middle",
    LOBE_RIGHT_LOWER: "right_lower",
    LOBE_LEFT_UPPER: "left_upper",
    LOBE_LEFT_LOWER: "left_lower",
}
NUM_LOBE_CLASSES: int = 6

# Lobe codes of public label maps, mapped to ours.
# Chest Imaging Platform label maps: low byte = region (4 RUL, 5 RML, 6 RLL, 7 LUL, 8 LLL).
CIP_LOBE_TO_LOBE: dict[int, int] = {4: 1, 5: 2, 6: 3, 7: 4, 8: 5}
# CIP lung regions: 2 right lung, 3 left lung.
CIP_LUNG_TO_LUNG: dict[int, int] = {2: LUNG_RIGHT, 3: LUNG_LEFT}
# TotalSegmentator v2 ids: 10 LUL, 11 LLL, 12 RUL, 13 RML, 14 RLL.
TOTALSEG_LOBE_TO_LOBE: dict[int, int] = {12: 1, 13: 2, 14: 3, 10: 4, 11: 5}

# Task labels.
SCREENING_LABELS: dict[int, str] = {0: "other_pneumonia", 1: "covid19"}
SEVERITY_LABELS: dict[int, str] = {0: "non_severe", 1: "severe"}
