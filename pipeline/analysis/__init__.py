"""Analysis jobs that read natural images and models: dataset examples, and the paper's probes."""
