"""What goes in: ``datasets`` (Karpathy splits, torch datasets and transforms, Visual Genome regions, COCO masks),
``jsonl`` (one's own JSON-lines data), ``flickr_entities`` (Flickr30K Entities files), ``mix`` (a run's training
data over one dataset or several, counted), ``demo`` and ``scenes`` (the synthetic demo world), ``photos`` (the
real-photo world), ``images`` (listing and decoding), ``decoded`` (images decoded as a loop draws them, and the one
rule for a file that fails there), ``words`` (tokeniser and word vectors), ``spans`` (a caption's phrases: their
tokens, and the steps the text path reads)."""
