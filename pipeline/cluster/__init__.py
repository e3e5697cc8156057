"""Infrastructure: starting or joining Ray, the object store, and sending stages to a running cluster."""
