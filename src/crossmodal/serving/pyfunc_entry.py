"""MLflow models-from-code entry point for the fused model (see crossmodal.serving.fused_model).

MLflow runs this file when it loads the model; it is not imported by the package itself.
"""

import mlflow
from crossmodal.serving.fused_model import CrossmodalPyfunc

mlflow.models.set_model(CrossmodalPyfunc())
