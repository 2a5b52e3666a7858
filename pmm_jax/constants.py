"""Shared constants: ignore label, class names, colour palettes, image statistics and the
pseudo-mask core's official thresholds and epsilons.

Every module that needs a class list or a palette imports it from here, so a dataset's
classes are defined exactly once.
"""

import numpy as np

IGNORE_LABEL = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

# Synthetic dataset (pmm_jax/data/synthetic.py): index 0 is background.
SYNTHETIC_CLASSES = ("background", "ring", "kite", "comet", "bar", "blob")

# COCO 2014 (pmm_jax/data/coco.py): the 80 category ids the instance annotations use (1..90
# with 10 gaps) and their names, in id order. Contiguous class k (1..80) is the k-th pair.
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CATEGORY_IDS = tuple(category_id for category_id, _ in COCO_CATEGORIES)
# The 81 contiguous classes (the ``coco2014_wsss/contiguous`` masks), background first.
COCO_CLASSES = ("background",) + tuple(name for _, name in COCO_CATEGORIES)
# COCO's 91-id label space (WSSS_MMSeg's COCODataset and PSPNet heads: 91 classes; the
# ``coco2014_wsss/original`` masks): 0 background, ids 1..90, of which these 10 are used by no
# annotation ("one background and 10 invalid", PMM paper section 4.1) and are ignored in
# evaluation (pmm_jax.scoring.IGNORED_CLASSES). Removing them and renumbering the rest gives
# COCO_CLASSES, so mIoU over the 81 contiguous classes is the 91-id mIoU with them ignored.
COCO_UNUSED_IDS = tuple(i for i in range(1, max(COCO_CATEGORY_IDS) + 1)
                        if i not in COCO_CATEGORY_IDS)
COCO91_CLASSES = ("background",) + tuple(
    dict(COCO_CATEGORIES).get(i, f"unused-{i}") for i in range(1, max(COCO_CATEGORY_IDS) + 1))

CLASS_NAMES = {
    "voc": VOC_CLASSES,
    "synthetic": SYNTHETIC_CLASSES,
    "coco": COCO_CLASSES,
    "coco91": COCO91_CLASSES,
}


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map as a ``[num_colors, 3]`` uint8 array.

    Colour ``i`` spreads the bits of ``i`` over the three channels, most significant first;
    255 (the ignore label) comes out as a light cream so boundaries stay visible.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


PALETTE = voc_palette()

# ImageNet statistics used to normalise network inputs (RGB, 0..255 scale).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# The same on the 0..1 scale, as the input pipeline divides by 255 first (data/pipeline.py's
# ``normalize``; segmentation/canvas.py does the same in numpy for predict and the export).
IMAGENET_MEAN_UNIT = (0.485, 0.456, 0.406)
IMAGENET_STD_UNIT = (0.229, 0.224, 0.225)

# The pseudo-mask core (pmm_jax/masks/core.py), official values: added to the range in
# min-max normalisation; added to the mean in the coefficient of variation; posterior above
# which a binary CRF's pixel is foreground (crf_k > 0.5); posterior above which a rough
# mask's pixel is labelled (infer_multi_scale.py --out_crf; others are IGNORE_LABEL).
CAM_NORM_EPS = 1e-5
COV_EPS = 1e-8
CRF_FG_THRESHOLD = 0.5
ROUGH_MASK_THRESHOLD = 0.9
