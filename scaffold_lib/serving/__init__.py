"""Serving: the registered student as an MLflow pyfunc model (scaffolded decoding behind `predict`), so
`mlflow models serve -m models:/scaffold-student@champion` answers questions and `mlflow.pyfunc.load_model` works."""
