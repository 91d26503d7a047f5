"""The sentiment lab: a procedural review corpus, a gold reward, a simulated labeler, the
KL-regularised optimum, evaluation and the report that ``prefalign demo`` writes."""
