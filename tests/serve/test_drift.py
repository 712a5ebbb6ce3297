"""DriftMonitor: KS, Jensen–Shannon and NLL shift against scipy, language ID, planted drift found."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats
from scipy.spatial.distance import jensenshannon

from orchestra.serve.drift import (
    DriftMonitor,
    identify_language,
    jensen_shannon_distance,
    kolmogorov_sf,
    ks_2samp,
)

SENTENCES = {
    "en": [
        "Can you summarise this report for my manager before the meeting tomorrow?",
        "Write a short poem about the sea and the lighthouse keeper.",
        "How do I reset my password if I no longer have access to my email?",
        "Explain the difference between a list and a tuple in Python.",
        "What are the main causes of inflation in a growing economy?",
    ],
    "fr": [
        "Peux-tu résumer ce rapport pour mon responsable avant la réunion de demain ?",
        "Écris un petit poème sur la mer et le gardien du phare.",
        "Comment puis-je réinitialiser mon mot de passe si je n'ai plus accès à ma messagerie ?",
        "Explique la différence entre une liste et un tuple en Python.",
        "Quelles sont les principales causes de l'inflation dans une économie en croissance ?",
    ],
    "de": [
        "Kannst du diesen Bericht vor der Besprechung morgen für meinen Chef zusammenfassen?",
        "Schreib ein kurzes Gedicht über das Meer und den Leuchtturmwärter.",
        "Wie setze ich mein Passwort zurück, wenn ich keinen Zugriff mehr auf meine E-Mails habe?",
        "Erkläre den Unterschied zwischen einer Liste und einem Tupel in Python.",
        "Was sind die wichtigsten Ursachen der Inflation in einer wachsenden Wirtschaft?",
    ],
    "es": [
        "¿Puedes resumir este informe para mi jefe antes de la reunión de mañana?",
        "Escribe un poema corto sobre el mar y el guardián del faro.",
        "¿Cómo restablezco mi contraseña si ya no tengo acceso a mi correo electrónico?",
        "Explica la diferencia entre una lista y una tupla en Python.",
        "¿Cuáles son las principales causas de la inflación en una economía en crecimiento?",
    ],
    "it": [
        "Puoi riassumere questo rapporto per il mio responsabile prima della riunione di domani?",
        "Scrivi una breve poesia sul mare e sul guardiano del faro.",
        "Come posso reimpostare la password se non ho più accesso alla mia posta elettronica?",
        "Spiega la differenza tra una lista e una tupla in Python.",
        "Quali sono le cause principali dell'inflazione in un'economia in crescita?",
    ],
    "pt": [
        "Você pode resumir este relatório para o meu gerente antes da reunião de amanhã?",
        "Escreva um pequeno poema sobre o mar e o guardião do farol.",
        "Como faço para redefinir a minha senha se já não tenho acesso ao meu e-mail?",
        "Explique a diferença entre uma lista e uma tupla em Python.",
        "Quais são as principais causas da inflação numa economia em crescimento?",
    ],
    "nl": [
        "Kun je dit rapport samenvatten voor mijn manager voor de vergadering van morgen?",
        "Schrijf een kort gedicht over de zee en de vuurtorenwachter.",
        "Hoe stel ik mijn wachtwoord opnieuw in als ik geen toegang meer heb tot mijn e-mail?",
        "Leg het verschil uit tussen een lijst en een tuple in Python.",
        "Wat zijn de belangrijkste oorzaken van inflatie in een groeiende economie?",
    ],
    "zh": [
        "你能在明天开会之前帮我把这份报告总结给我的经理吗？",
        "写一首关于大海和灯塔守护人的短诗。",
        "如果我无法再登录我的电子邮箱，我该如何重置密码？",
        "请解释一下 Python 中列表和元组的区别。",
        "在经济增长的时候，通货膨胀的主要原因是什么？",
    ],
    "ja": [
        "明日の会議の前に、このレポートを上司のために要約してもらえますか？",
        "海と灯台守についての短い詩を書いてください。",
        "メールにアクセスできなくなった場合、パスワードはどうやってリセットしますか？",
        "Python のリストとタプルの違いを説明してください。",
        "成長している経済におけるインフレの主な原因は何ですか？",
    ],
    "ru": [
        "Можешь кратко изложить этот отчёт для моего руководителя до завтрашней встречи?",
        "Напиши короткое стихотворение о море и смотрителе маяка.",
        "Как сбросить пароль, если у меня больше нет доступа к электронной почте?",
        "Объясни разницу между списком и кортежем в Python.",
        "Каковы основные причины инфляции в растущей экономике?",
    ],
    "ar": [
        "هل يمكنك تلخيص هذا التقرير لمديري قبل اجتماع الغد؟",
        "اكتب قصيدة قصيرة عن البحر وحارس المنارة.",
        "كيف أعيد تعيين كلمة المرور إذا لم يعد بإمكاني الوصول إلى بريدي الإلكتروني؟",
        "اشرح الفرق بين القائمة والصف في بايثون.",
        "ما هي الأسباب الرئيسية للتضخم في اقتصاد متنامٍ؟",
    ],
}


def test_language_identifier_on_written_sentences() -> None:
    results = {lang: [identify_language(s) for s in texts] for lang, texts in SENTENCES.items()}
    correct = sum(got == lang for lang, guesses in results.items() for got in guesses)
    total = sum(len(texts) for texts in SENTENCES.values())
    # 55 of 55 when written; one miss per language would still be a usable drift signal.
    assert correct / total >= 0.95, results
    assert all(sum(g == lang for g in guesses) >= 4 for lang, guesses in results.items()), results


@pytest.mark.parametrize("text", ["", "hi", "What is 2+2?", "1234 5678 90", "你好吗"])
def test_too_little_text_is_undetermined(text: str) -> None:
    assert identify_language(text) == "und"


def test_language_is_deterministic() -> None:
    text = "Het weer is mooi vandaag en we gaan naar het park."
    assert len({identify_language(text) for _ in range(20)}) == 1


@pytest.mark.parametrize(
    ("m", "n", "shift", "integers"),
    [(50, 50, 0.0, False), (500, 500, 0.15, False), (30, 70, 0.4, False), (200, 200, 1.0, False),
     (400, 400, 0.0, True), (300, 300, 3.0, True), (1, 5, 0.0, False), (120, 80, 0.2, True)],
)  # fmt: skip
def test_ks_matches_scipy(m: int, n: int, shift: float, integers: bool) -> None:
    rng = np.random.default_rng(m * 1000 + n)
    a, b = rng.normal(20, 5, m), rng.normal(20 + shift * 5, 5, n)
    if integers:  # prompt lengths are integers: many ties
        a, b = np.round(a), np.round(b)
    d, p = ks_2samp(a, b)
    ref = stats.ks_2samp(a, b, method="exact")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)


def test_ks_edge_cases() -> None:
    assert ks_2samp([3, 3, 3], [3, 3]) == (0.0, 1.0)
    d, p = ks_2samp(np.arange(100), np.arange(100) + 1000)
    assert d == 1.0 and p == pytest.approx(stats.ks_2samp(np.arange(100), np.arange(100) + 1000).pvalue)
    with pytest.raises(ValueError, match="non-empty"):
        ks_2samp([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        ks_2samp([1.0, math.nan], [1.0])


@pytest.mark.parametrize("x", [0.05, 0.3, 0.8, 0.99, 1.0, 1.3, 2.0, 3.5])
def test_kolmogorov_limit_matches_scipy(x: float) -> None:
    assert kolmogorov_sf(x) == pytest.approx(stats.kstwobign.sf(x), rel=1e-9, abs=1e-15)


def test_large_windows_use_the_limit_close_to_scipy() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 3000), rng.normal(0.08, 1, 3000)
    d, p = ks_2samp(a, b)
    ref = stats.ks_2samp(a, b)
    assert d == pytest.approx(ref.statistic)
    assert p == pytest.approx(stats.kstwobign.sf(math.sqrt(1500) * d), rel=1e-9)
    assert p == pytest.approx(ref.pvalue, rel=0.05)  # the limit against scipy's finite-n answer


@pytest.mark.parametrize(
    ("p", "q"),
    [({"en": 1.0}, {"en": 1.0}), ({"en": 0.5, "fr": 0.5}, {"en": 0.9, "de": 0.1}), ({"en": 1.0}, {"zh": 1.0}),
     ({"en": 0.7, "fr": 0.2, "und": 0.1}, {"en": 0.6, "fr": 0.3, "und": 0.1})],
)  # fmt: skip
def test_jensen_shannon_matches_scipy(p: dict[str, float], q: dict[str, float]) -> None:
    labels = sorted(set(p) | set(q))
    ref = jensenshannon([p.get(k, 0) for k in labels], [q.get(k, 0) for k in labels], base=2)
    assert jensen_shannon_distance(p, q) == pytest.approx(ref, abs=1e-7)


def feed(
    monitor: DriftMonitor,
    version: str,
    rng: np.random.Generator,
    count: int,
    *,
    length_mean: float,
    nll_mean: float,
    languages: tuple[str, ...],
    nll_every: int = 2,
) -> tuple[list[int], list[float]]:
    """Observe ``count`` requests; returns the lengths and NLLs fed (the test's own record)."""
    lengths, nlls = [], []
    for i in range(count):
        length = max(1, round(rng.normal(length_mean, 8)))
        nll = float(rng.normal(nll_mean, 0.3)) if i % nll_every == 0 else None
        text = str(rng.choice(SENTENCES[str(rng.choice(languages))]))
        monitor.observe(version=version, prompt_tokens=length, text=text, prompt_nll=nll)
        lengths.append(length)
        if nll is not None:
            nlls.append(nll)
    return lengths, nlls


def gauges(monitor: DriftMonitor) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(monitor.registry).decode()):
        for sample in family.samples:
            out[(sample.name, sample.labels["version"])] = sample.value
    return out


def test_same_traffic_scores_low_and_planted_shift_is_detected() -> None:
    window = 60
    monitor = DriftMonitor(window)
    rng = np.random.default_rng(0)
    mix = ("en", "en", "en", "fr")
    ref_len, ref_nll = feed(monitor, "a", rng, window, length_mean=40, nll_mean=3.0, languages=mix)
    feed(monitor, "b", rng, window, length_mean=40, nll_mean=3.0, languages=mix)
    snap = monitor.snapshot()
    assert snap["versions"]["a"]["reference"]["n"] == window
    assert snap["versions"]["a"]["drift"] is None and snap["versions"]["a"]["filling"] == 0
    assert gauges(monitor) == {}  # nothing compared yet: no drift gauge reads 0 by default

    # Version a keeps its traffic; version b shifts: longer prompts, Chinese and Russian, higher NLL.
    same_len, same_nll = feed(monitor, "a", rng, window, length_mean=40, nll_mean=3.0, languages=mix)
    feed(monitor, "b", rng, window, length_mean=70, nll_mean=4.0, languages=("zh", "ru"))
    snap = monitor.snapshot()
    json.dumps(snap, allow_nan=False)  # served as JSON: no NaN or infinity
    same, shifted = snap["versions"]["a"]["drift"], snap["versions"]["b"]["drift"]

    assert same["prompt_length_ks"] == pytest.approx(stats.ks_2samp(ref_len, same_len).statistic)
    assert same["prompt_length_ks_pvalue"] == pytest.approx(
        stats.ks_2samp(ref_len, same_len).pvalue, rel=1e-6
    )
    assert same["prompt_length_ks_pvalue"] > 0.01
    assert same["language_js"] < 0.2
    assert same["prompt_nll_delta"] == pytest.approx(np.mean(same_nll) - np.mean(ref_nll))
    assert same["prompt_nll_z"] == pytest.approx(
        stats.ttest_ind(same_nll, ref_nll, equal_var=False).statistic
    )
    assert abs(same["prompt_nll_z"]) < 3

    assert shifted["prompt_length_ks"] > 0.8 and shifted["prompt_length_ks_pvalue"] < 1e-10
    assert shifted["language_js"] > 0.95  # disjoint language sets: distance 1
    assert shifted["prompt_nll_delta"] == pytest.approx(1.0, abs=0.2)
    assert shifted["prompt_nll_z"] > 10

    current = snap["versions"]["b"]["current"]
    assert set(current["languages"]) == {"zh", "ru"}
    assert sum(current["languages"].values()) == pytest.approx(1.0)
    assert current["prompt_tokens"]["mean"] > 60 and current["prompt_nll"]["n"] == window // 2
    assert snap["versions"]["b"]["reference"]["languages"].keys() <= {"en", "fr"}

    found = gauges(monitor)
    assert found[("orchestra_drift_prompt_length_ks", "b")] == shifted["prompt_length_ks"]
    assert found[("orchestra_drift_language_js", "b")] == shifted["language_js"]
    assert found[("orchestra_drift_prompt_nll_delta", "b")] == shifted["prompt_nll_delta"]
    assert found[("orchestra_drift_prompt_nll_z", "a")] == same["prompt_nll_z"]
    assert found[("orchestra_drift_prompt_length_ks_pvalue", "a")] == same["prompt_length_ks_pvalue"]


def test_later_windows_compare_with_the_first() -> None:
    monitor = DriftMonitor(10)
    for length in [10] * 10 + [10] * 10 + [50] * 10 + [10] * 4:
        monitor.observe(version="v", prompt_tokens=length, text="The weather is fine today, thank you.")
    state = monitor.snapshot()["versions"]["v"]
    assert state["windows_compared"] == 2 and state["filling"] == 4 and state["observed"] == 34
    assert state["reference"]["prompt_tokens"]["max"] == 10
    assert state["current"]["prompt_tokens"]["mean"] == 50
    assert state["drift"]["prompt_length_ks"] == 1.0
    assert state["drift"]["prompt_nll_delta"] is None and state["drift"]["prompt_nll_z"] is None
    assert state["drift"]["language_js"] == 0.0
    assert ("orchestra_drift_prompt_nll_delta", "v") not in gauges(monitor)


def test_shares_the_given_registry() -> None:
    from orchestra.serve.metrics import ServingMetrics

    metrics = ServingMetrics()
    monitor = DriftMonitor(2, registry=metrics.registry)
    for _ in range(4):
        monitor.observe(version="v", prompt_tokens=5, text="Good morning, how are you doing today?")
    assert b"orchestra_drift_prompt_length_ks{" in metrics.render()[0]


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [({"prompt_tokens": -1}, "prompt_tokens"), ({"prompt_tokens": 2.5}, "prompt_tokens"),
     ({"text": None}, "text"), ({"prompt_nll": math.nan}, "prompt_nll")],
)  # fmt: skip
def test_bad_observations_name_the_field(kwargs: dict[str, object], culprit: str) -> None:
    call = {"version": "v", "prompt_tokens": 3, "text": "hello there", **kwargs}
    with pytest.raises(ValueError, match=culprit):
        DriftMonitor(5).observe(**call)  # type: ignore[arg-type]


@pytest.mark.parametrize("window", [0, 1, 2.5, True])
def test_bad_window(window: object) -> None:
    with pytest.raises(ValueError, match="window"):
        DriftMonitor(window)  # type: ignore[arg-type]


def test_numpy_scalars_are_accepted() -> None:
    monitor = DriftMonitor(2)
    for length, nll in [(5, 2.0), (6, 2.5), (50, 3.0), (60, 3.5)]:
        monitor.observe(
            version="v",
            prompt_tokens=np.int64(length),
            text="A short English sentence here.",
            prompt_nll=np.float32(nll),
        )
    drift = monitor.snapshot()["versions"]["v"]["drift"]
    json.dumps(monitor.snapshot(), allow_nan=False)
    assert drift["prompt_length_ks"] == 1.0 and drift["prompt_nll_delta"] == pytest.approx(1.0)
