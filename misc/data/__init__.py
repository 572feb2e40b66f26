"""What goes in: ``datasets`` (Karpathy splits, torch datasets and transforms, Visual Genome regions, COCO masks),
``jsonl`` (one's own JSON-lines data), ``flickr_entities`` (Flickr30K Entities files), ``demo`` and ``scenes`` (the
synthetic demo world), ``photos`` (the real-photo world), ``images`` (listing and decoding), ``words`` (tokeniser
and word vectors), ``spans`` (a caption's phrases: their tokens, and the steps the text path reads)."""
