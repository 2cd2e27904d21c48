"""Training stages: pretrain, SFT, RL, and the loop pieces they share."""
