"""Gradient and zeroth-order baselines on the same Flax models: FedAvg, FedZO,
BAFFLE, pFedMe and pFedZO (local: the client map; zeroth_order: the
estimators; algorithms; experiment: runs and results). The nu-step meta-FL
FedAvg and PersA-FL are still to come."""
