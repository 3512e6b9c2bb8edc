"""Analysis on top of trained bundles: the split/codec planner, the accuracy-cost frontier, the calibration study."""
