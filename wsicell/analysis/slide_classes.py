"""Slide-level prediction from cell-type proportion vectors (method section 3).

Unsupervised: k-means with k-means++ initialisation on the slides' proportion vectors;
each slide takes the nearest centre.  Supervised: an L2-regularised linear SVM trained
on slide labels, scored by stratified k-fold cross-validation (precision, recall,
F-score, support-weighted over classes as the paper reports them).

Fitted models are saved as plain JSON (centres, or coefficients / intercepts / classes),
never as pickles, so a saved classifier from an untrusted source cannot run code when
it is loaded, and it can be reused on new slides.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from wsicell import __version__
from wsicell.analysis.proportions import proportion_columns
from wsicell.config import PredictConfig
from wsicell.errors import WsicellError
from wsicell.files import read_json


@dataclass(frozen=True)
class SlideKMeans:
    """k-means centres of slide proportion vectors.

    Attributes
    ----------
    centres : ndarray, shape (C, k), float64
    """

    centres: np.ndarray

    @classmethod
    def fit(cls, proportions: np.ndarray, n_clusters: int, seed: int = 0) -> "SlideKMeans":
        """k-means++ (10 restarts) on ``proportions`` of shape (S, k), S >= n_clusters."""
        proportions = np.asarray(proportions, dtype=np.float64)
        if len(proportions) < n_clusters:
            raise WsicellError(f"k-means of slides: {len(proportions)} slide(s) cannot form "
                               f"{n_clusters} clusters")
        km = KMeans(n_clusters=n_clusters, init="k-means++", n_init=10, random_state=seed)
        km.fit(proportions)
        return cls(km.cluster_centers_)

    def assign(self, proportions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centre of each slide.

        Parameters
        ----------
        proportions : ndarray, shape (S, k)

        Returns
        -------
        cluster : ndarray, shape (S,), int64
        distance : ndarray, shape (S,), float64
            Euclidean distance to that centre.
        """
        d = np.linalg.norm(np.asarray(proportions)[:, None, :] - self.centres[None], axis=-1)
        cluster = d.argmin(axis=1)
        return cluster, d[np.arange(len(d)), cluster]

    def to_json(self) -> dict:
        return {"kind": "slide_kmeans", "centres": self.centres.tolist(),
                "wsicell_version": __version__}


@dataclass(frozen=True)
class SlideClassifier:
    """A fitted linear SVM on proportion vectors, storable as JSON.

    Attributes
    ----------
    classes : tuple of str
        Class names, in the order of the SVM.
    coef : ndarray, shape (1, k) for two classes, (C, k) otherwise, float64
    intercept : ndarray, shape (1,) or (C,), float64
    c : float
        The SVM's inverse regularisation strength.
    """

    classes: tuple[str, ...]
    coef: np.ndarray
    intercept: np.ndarray
    c: float = 1.0

    @property
    def n_features(self) -> int:
        return self.coef.shape[1]

    @classmethod
    def fit(cls, proportions: np.ndarray, labels, c: float = 1.0, seed: int = 0) -> "SlideClassifier":
        """Train an L2-regularised linear SVM (squared hinge loss).

        Parameters
        ----------
        proportions : ndarray, shape (S, k)
        labels : sequence of str, length S, at least two distinct values
        """
        svm = LinearSVC(penalty="l2", C=c, random_state=seed, max_iter=100_000)
        svm.fit(np.asarray(proportions, dtype=np.float64), np.asarray(labels, dtype=str))
        return cls(tuple(str(x) for x in svm.classes_), svm.coef_.copy(), svm.intercept_.copy(), c)

    def decision(self, proportions: np.ndarray) -> np.ndarray:
        """Decision values, shape (S, 1) for two classes (positive = ``classes[1]``), else (S, C)."""
        proportions = np.asarray(proportions, dtype=np.float64)
        if proportions.ndim != 2 or proportions.shape[1] != self.n_features:
            raise WsicellError(f"slide classifier: trained on {self.n_features} cell types, "
                               f"got proportion vectors of shape {proportions.shape}")
        return proportions @ self.coef.T + self.intercept

    def predict(self, proportions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted class and its score (signed margin) of each slide.

        Returns
        -------
        classes : ndarray, shape (S,), str
        score : ndarray, shape (S,), float64
            Decision value of the predicted class (two classes: absolute margin).
        """
        decision = self.decision(proportions)
        if decision.shape[1] == 1:
            index = (decision[:, 0] > 0).astype(int)
            score = np.abs(decision[:, 0])
        else:
            index = decision.argmax(axis=1)
            score = decision[np.arange(len(decision)), index]
        return np.asarray(self.classes)[index], score

    def to_json(self) -> dict:
        return {"kind": "slide_linear_svm", "classes": list(self.classes),
                "coef": self.coef.tolist(), "intercept": self.intercept.tolist(), "c": self.c,
                "wsicell_version": __version__}

    @classmethod
    def from_json(cls, data: dict, source: str = "classifier") -> "SlideClassifier":
        """Rebuild from :meth:`to_json` data, validating shapes (never executes anything)."""
        try:
            if data.get("kind") != "slide_linear_svm":
                raise ValueError("not a wsicell slide classifier")
            classes = tuple(str(x) for x in data["classes"])
            coef = np.asarray(data["coef"], dtype=np.float64)
            intercept = np.asarray(data["intercept"], dtype=np.float64)
            rows = 1 if len(classes) == 2 else len(classes)
            if len(classes) < 2 or coef.ndim != 2 or coef.shape[0] != rows \
                    or intercept.shape != (rows,):
                raise ValueError("inconsistent classes / coef / intercept shapes")
            return cls(classes, coef, intercept, float(data.get("c", 1.0)))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise WsicellError(f"{source}: invalid slide classifier ({err})") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SlideClassifier":
        path = Path(path)
        data = read_json(path, "JSON slide classifier")
        return cls.from_json(data if isinstance(data, dict) else {}, str(path))


def cross_validate(proportions: np.ndarray, labels, folds: int, c: float = 1.0,
                   seed: int = 0) -> dict:
    """Stratified k-fold cross-validation of :class:`SlideClassifier`.

    Every slide is predicted once, by the SVM trained on the other folds; precision,
    recall and F-score of those predictions are averaged over classes weighted by
    support.  ``folds`` is lowered to the size of the smallest class (with a warning).

    Parameters
    ----------
    proportions : ndarray, shape (S, k)
    labels : sequence of str, length S
    folds : int

    Returns
    -------
    dict
        ``precision``, ``recall``, ``fscore``, ``folds`` (used), ``predicted`` (list, S).
    """
    labels = np.asarray(labels, dtype=str)
    proportions = np.asarray(proportions, dtype=np.float64)
    smallest = np.unique(labels, return_counts=True)[1].min()
    if smallest < 2:
        raise WsicellError("slide labels: every class needs at least 2 slides for "
                           "cross-validation")
    if folds > smallest:
        warnings.warn(f"cross-validation: {folds} folds lowered to {smallest}, the size of "
                      "the smallest class", stacklevel=2)
        folds = int(smallest)
    predicted = np.empty(len(labels), dtype=object)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in split.split(proportions, labels):
        if len(np.unique(labels[train])) < 2:
            predicted[test] = labels[train][0]
            continue
        predicted[test] = SlideClassifier.fit(proportions[train], labels[train], c, seed) \
            .predict(proportions[test])[0]
    predicted = predicted.astype(str)
    precision, recall, fscore, _ = precision_recall_fscore_support(
        labels, predicted, average="weighted", zero_division=0)
    return {"precision": float(precision), "recall": float(recall), "fscore": float(fscore),
            "folds": folds, "predicted": predicted.tolist()}


def read_slide_labels(path: str | Path, slide_ids) -> pd.Series:
    """Read a ``slide_id,label`` CSV and check it against the known slides.

    Parameters
    ----------
    path : str or Path
    slide_ids : iterable of str
        The slides being predicted.

    Returns
    -------
    pandas.Series
        Label (str) indexed by slide id, in file order; slides absent from the file are
        simply unlabelled.

    Raises
    ------
    WsicellError
        Missing file or columns, empty or duplicated slide ids, slides that are not
        known, fewer than two distinct classes.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise WsicellError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise WsicellError(f"{path}: not a readable CSV ({err})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if not {"slide_id", "label"} <= set(table.columns):
        raise WsicellError(f"{path}: needs columns slide_id,label; found {list(table.columns)}")
    table = table.assign(slide_id=table.slide_id.str.strip(), label=table.label.str.strip())
    if (table.slide_id == "").any() or (table.label == "").any():
        raise WsicellError(f"{path}: empty slide_id or label")
    duplicated = table.slide_id[table.slide_id.duplicated()].unique()
    if len(duplicated):
        raise WsicellError(f"{path}: slide(s) listed twice: {', '.join(duplicated[:5])}")
    unknown = sorted(set(table.slide_id) - set(slide_ids))
    if unknown:
        raise WsicellError(f"{path}: unknown slide(s) {', '.join(unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''} (not among the predicted slides)")
    if table.label.nunique() < 2:
        raise WsicellError(f"{path}: needs at least two distinct labels, found "
                           f"{table.label.unique().tolist()}")
    return pd.Series(table.label.to_numpy(), index=pd.Index(table.slide_id, name="slide_id"),
                     name="label")


def predict_slides(table: pd.DataFrame, k: int, config: PredictConfig, seed: int,
                   labels: pd.Series | None, classifier: SlideClassifier | None
                   ) -> tuple[pd.DataFrame, dict, dict]:
    """Slide-level predictions from the slides' proportion vectors.

    k-means (k-means++) into ``config.slide_clusters`` groups when there are enough slides;
    with ``labels``, stratified cross-validation (``config.folds``) of the linear SVM and an
    SVM fitted on all labelled slides; with a loaded ``classifier``, its predictions.

    Parameters
    ----------
    table : DataFrame
        One row per slide: ``slide_id``, ``n_cells`` and the proportions ``p_0..p_{k-1}``.
    k : int
    config : PredictConfig
    seed : int
        Seed of k-means, the folds and the SVM.
    labels : Series (index slide_id, values str), optional
    classifier : SlideClassifier, optional

    Returns
    -------
    predictions : DataFrame
        ``slide_id``, ``n_cells``, ``p_*``, ``kmeans_cluster``, ``kmeans_distance`` and, when
        available, ``label``, ``cv_predicted``, ``svm_class``, ``svm_score``.
    summary : dict
        What was fitted and the cross-validation figures.
    fitted : dict
        The fitted models to save, ``{file name: JSON data}`` (``slide_kmeans.json``,
        ``slide_classifier.json``).
    """
    cfg = config
    proportions = table[proportion_columns(k)].fillna(0).to_numpy()
    predictions = table[["slide_id", "n_cells", *proportion_columns(k)]].copy()
    summary: dict = {}
    fitted: dict = {}
    if len(table) >= cfg.slide_clusters:
        if len(np.unique(proportions, axis=0)) < cfg.slide_clusters:
            warnings.warn(f"fewer than {cfg.slide_clusters} distinct proportion vectors among "
                          f"the slides: some of the {cfg.slide_clusters} slide clusters are "
                          "duplicates", stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans = SlideKMeans.fit(proportions, cfg.slide_clusters, seed=seed)
        predictions["kmeans_cluster"], predictions["kmeans_distance"] = kmeans.assign(proportions)
        fitted["slide_kmeans.json"] = kmeans.to_json()
        summary["kmeans"] = {"clusters": cfg.slide_clusters, "file": "slide_kmeans.json"}
    else:
        warnings.warn(f"{len(table)} slide(s): too few for {cfg.slide_clusters} slide clusters; "
                      "k-means of slides skipped", stacklevel=2)
    if labels is not None:
        predictions["label"] = predictions.slide_id.map(labels).fillna("")
        known = predictions.label != ""
        cv = cross_validate(proportions[known], predictions.label[known], cfg.folds,
                            seed=seed)
        predictions.loc[known, "cv_predicted"] = cv.pop("predicted")
        summary["cross_validation"] = cv
        classifier = SlideClassifier.fit(proportions[known], predictions.label[known],
                                         seed=seed)
        fitted["slide_classifier.json"] = classifier.to_json()
        summary["classifier"] = {"classes": list(classifier.classes), "file": "slide_classifier.json"}
    if classifier is not None:
        predictions["svm_class"], predictions["svm_score"] = classifier.predict(proportions)
    return predictions, summary, fitted
