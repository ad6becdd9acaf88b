"""Iterative preference optimisation with a critic (IPO) and its self-refinement (Dual-IPO): ``vidpo iterate``.

layout.py   ``RunLayout``: where everything of one iterate run lives, and the world / oracle it works in
rounds.py   the rounds: generate -> critic labels -> train -> evaluate, resumable stage by stage
critic.py   the critic's Bradley-Terry-with-ties loss, its training data, training and accuracy
pairing.py  pairs built from the critic's scores of a pool of videos (KTO desirable/undesirable, ranked DPO)
dual.py     Dual-IPO: majority-vote pseudo-labels filtered and weighted by the preference certainty estimate
reuse.py    linking what another run of the same seed already computed
sweep.py    several recipes x seeds, in parallel processes, aggregated per round
report.py   the rounds figure, table and report of a run or a sweep
"""
