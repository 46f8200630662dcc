"""letKD's stage-one fit (``kdpipe cluster``): streaming LDA (``lda``), K-means on the
penultimate vectors and per-class sub-class K-means (``clustering``)."""
