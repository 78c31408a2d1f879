"""SageMaker endpoints: the predictor, request and response bodies, what a run will send."""
