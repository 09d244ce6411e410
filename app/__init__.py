"""Med-DDPM synthesis as a MONAI Deploy application (`python -m app --help`)."""
