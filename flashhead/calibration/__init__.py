"""What convert calibrates on and eval measures with: the texts, the model's own answers and
samples, hidden-state sampling, model loading, cluster ranks and probes-for-target.

convert -> calibration <- evaluation: neither of those imports the other."""
