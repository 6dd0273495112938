"""The ``personalize=`` options: their names, their parameters and what each refuses."""

from __future__ import annotations

from collections.abc import Mapping

from fedad.config import Settings, checks

# personalize=<name> (conf/personalize/).
PERSONALIZATIONS = ("none", "finetune", "ditto", "fedper", "fedrep")
# The parameters each method takes besides its name.
PARAMETERS = {
    "none": (),
    "finetune": ("epochs",),
    "ditto": ("epochs", "lambda"),
    "fedper": (),
    "fedrep": ("head_epochs",),
}
# The methods that federate the model's body and keep its head at each site.
HEAD_METHODS = ("fedper", "fedrep")
# The models a site can personalize: the Keras classifiers, whose weights a site trains with
# fedad's proximal term. Boosted trees have no personal model yet; the autoencoder's decision is
# its federation's threshold, which a personal model would not share.
PERSONAL_MODELS = ("cnn", "logistic", "mlp")
# The models with a body below their head (fedad.models.keras_models.HEAD_LAYER): logistic
# regression is its head alone.
HEAD_MODELS = ("cnn", "mlp")
# The final evaluate reply's personal metrics: the global model's names with this prefix.
PREFIX = "personal_"


def method(settings: Settings) -> str:
    """The run's ``personalize.name``; ``none`` for settings written before it existed."""
    return str(settings.get("personalize.name", "none") or "none")


def check_config(
    personalize_cfg: Mapping,
    model: str | None,
    strategy: str | None = None,
    privacy: str = "none",
) -> list[str | None]:
    """What is wrong with a ``personalize`` config; no phrase when the run can carry it out.

    Parameters
    ----------
    personalize_cfg : Mapping
        ``name`` and the method's parameters (``epochs``, ``lambda``, ``head_epochs``).
    model : str or None
        The federated model's name: only the Keras classifiers have a personal
        model, and only those with a body below their head a local head.
    strategy : str, optional
        ``strategy.name``: SCAFFOLD's control variates span the whole model.
    privacy : str
        ``privacy.name``: Flower's DP wrappers and mods expect whole models.

    Returns
    -------
    list[str or None]
        One phrase per problem, naming the key.
    """
    name = personalize_cfg.get("name", "none")
    if name not in PERSONALIZATIONS:
        return [f"personalize must be one of {', '.join(PERSONALIZATIONS)}, got {name!r}"]
    if name == "none":
        return []
    own = PARAMETERS[name]
    problems: list[str | None] = [
        f"personalize.{key} is not a parameter of {name} (it takes: {', '.join(own) or 'none'})"
        for key in personalize_cfg
        if key not in ("name", *own)
    ]
    problems += [
        checks.number(personalize_cfg, key, "personalize", whole=True, low=1)
        for key in ("epochs", "head_epochs")
    ]
    problems.append(
        checks.number(
            personalize_cfg,
            "lambda",
            "personalize",
            low=0,
            hint="the pull towards the global model",
        )
    )
    problems.append(_model_problem(name, model))
    if name in HEAD_METHODS:
        problems += _beside_heads(name, strategy, privacy)
    return problems


def _model_problem(name: str, model: str | None) -> str | None:
    """Why ``model`` has no personal model of the kind ``personalize=name`` trains, or None."""
    heads = name in HEAD_METHODS
    allowed = HEAD_MODELS if heads else PERSONAL_MODELS
    if model in allowed:
        return None
    if model == "xgboost":
        why = (
            "there is no personal tree model (a site's boosted trees can be neither fine-tuned "
            "nor pulled towards the global ensemble, and have no layers to split into a shared "
            "body and a local head)"
        )
    elif model == "logistic":
        why = (
            "logistic regression is a single layer: its head (the output layer) is the whole "
            "model, and there is no body to federate"
        )
    else:
        why = "its decision is the federation's threshold, which a personal model would not share"
    kind = "federates the body of" if heads else "trains a personal copy of"
    return (
        f"personalize={name} {kind} a Keras classifier at each site (model={', '.join(allowed)})"
        f"; model={model} has none: {why} — use personalize=none or one of those models"
        + (" (or personalize=ditto or finetune)" if heads and model == "logistic" else "")
    )


def _beside_heads(name: str, strategy: str | None, privacy: str) -> list[str | None]:
    """What a local head cannot run beside: settings that expect a reply to hold the whole model."""
    problems: list[str | None] = []
    if strategy == "scaffold":
        problems.append(
            f"personalize={name} sends back the model's body only, and strategy=scaffold's "
            "control variates and their correction span the whole model — use another strategy "
            f"with personalize={name}, or personalize=ditto or finetune with scaffold"
        )
    if privacy != "none":
        problems.append(
            f"personalize={name} sends back the model's body only, and privacy={privacy} "
            "(Flower's DP wrappers and mods) clips and noises a reply as the whole model it "
            f"received — use privacy=none with personalize={name}, or personalize=ditto or "
            f"finetune with privacy={privacy}"
        )
    return problems
