"""Reading prepared data sets: the training order of windows per rank, consecutive validation batches, and
data sets kept in the object store."""
