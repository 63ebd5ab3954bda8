"""What users read and look at: readers for downstream study, the atlas, figures, status."""
