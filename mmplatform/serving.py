"""The registered model's code, logged as MLflow "models from code": MLflow runs this file to build the pyfunc
(:class:`mmplatform.registry.MMPlatformModel`), so the registered model holds no pickled Python object, and the
package itself travels with it (``code_paths``) instead of being installed from an index when it is served."""

from mlflow.models import set_model

from mmplatform.registry import MMPlatformModel

set_model(MMPlatformModel())
