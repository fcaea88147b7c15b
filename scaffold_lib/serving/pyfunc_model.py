"""What MLflow runs to load a registered student (a "model from code": no pickle in the model version)."""

from mlflow.models import set_model

from scaffold_lib.serving.student import ScaffoldStudentModel

set_model(ScaffoldStudentModel())
