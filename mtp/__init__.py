"""Multi-token-prediction heads as the rollout's speculative drafter (not built yet:
see the open issue "MTP speculation in rollout")."""
