"""Reading prepared data sets: the training order of windows per rank, and consecutive validation batches
(a data set kept in the object store is pulled by data_prep.dataset_store before it is read)."""
