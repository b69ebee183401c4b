"""Gradient and zeroth-order baselines on the same Flax models: FedAvg, FedZO,
BAFFLE, pFedMe and pFedZO (local: the client map; zeroth_order: the
estimators; algorithms; experiment: runs and results), the nu-step meta-FL
FedAvg (meta_fl) and PersA-FL's asynchronous server (persafl)."""
