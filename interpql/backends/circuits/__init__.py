"""Attribution graphs (circuit tracing) over transcoder latents.

linearised.py  the replacement model's pass: attention patterns and LayerNorm scales frozen at
               their values on the prompt, each MLP replaced by its transcoder's active latents
               (sources) plus an error node, so every later activation is affine in the sources
attribution.py the graph's edges: batched backward passes from logit and latent targets
pruning.py     influence, pruning by cumulative influence, replacement and completeness scores
"""
