"""Gradient and zeroth-order baselines on the same Flax models (FedAvg, FedZO,
BAFFLE, pFedMe, pFedZO, nu-step meta-FL, PersA-FL): not written yet."""
