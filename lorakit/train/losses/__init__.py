"""Losses as pure functions over log-probs (torchtune style): a test feeds them numbers by hand.

    grpo        GRPO's advantages, clipped per-token objective, KL and reductions (TRL's GRPOTrainer)
    preference  DPO (sigmoid with label smoothing, ipo, hinge), ORPO and SimPO over sequence log-probs
"""
