"""The research harness: simulated users, metrics, peers (baselines), the evaluation loop, the paper's
experiments, training of the shipped models, the demo and its datasets. The library never imports it."""
