"""Evaluation: reconstruction quality and semantic fidelity, with the protocol stated."""
