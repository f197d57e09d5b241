"""Object phrases from a caption, by a small rule-based chunker (no spaCy/NLTK model download).

Captions from BLIP-style captioners are short and regular ("a man in a space suit holding a
helmet", "there is a cup of coffee on a table"), so a stop-word grammar is enough: the caption is
cut at prepositions, conjunctions, verbs and punctuation; each piece loses its leading determiners
and numbers; what remains (adjectives + noun) is a phrase unless its head is a picture word
("photo", "view"), a position word ("front", "left") or a time word ("night", "sunset"). "X of Y"
stays whole when X is a container or group word ("a cup of coffee", "a bunch of coins"). A past
participle that ends its piece is a verb ("a rocket launched into ...", "a car parked"), one before
a noun an adjective ("a stuffed animal").
"""

from __future__ import annotations

import re

from layerdiff.data.mlcid.stages import PhraseExtractor

_DETERMINERS = frozenset(
    "a an the this that these those some any each every his her their its my our your one two three four five "
    "six seven eight nine ten several many few lots lot couple bunch pair other another both all".split()
)
_BREAKS = frozenset(
    # prepositions and conjunctions
    "in on at of with without by for from to into onto over under above below behind beside besides next near "
    "between among around through across along against inside outside while and or but as than like up down off "
    "out after before during toward towards upon via who which that where when while whose "
    # auxiliaries and frequent caption verbs (present tense; -ing forms are caught by the suffix rule)
    "is are was were be been being am has have had do does did can could will would may might "
    "holds hold sits sit stands stand looks look lays lay lies lie shows show wears wear rides ride "
    "eats eat plays play walks walk runs run flies fly takes take made make covered filled topped "
    "parked stacked dressed seated placed shown taken painted "
    # words that never start or end an object phrase
    "there here it they he she we you i very so too just also only not no".split()
)
# -ing words that are nouns, not verbs
_ING_NOUNS = frozenset(
    "building buildings ceiling clothing painting paintings ring rings king string wing wings evening morning "
    "thing things railing railings sling pudding stuffing icing frosting awning awnings bedding topping toppings "
    "dumpling dumplings sibling siblings seedling".split()
)
# heads that are not objects: picture and framing words, positions, BLIP's "arafed" artefacts
_NOT_OBJECTS = frozenset(
    "photo photograph picture image view close closeup shot scene background foreground front back side top "
    "bottom middle center centre left right corner edge part kind sort type way day time front-view image"
    " arafed araffe araffed arafe arafly".split()
)
# times of day and year: when, not what ("a city at night"), though they may describe one ("night sky")
_TIMES = frozenset(
    "night nighttime daytime evening morning afternoon dusk dawn sunset sunrise twilight noon midnight "
    "winter summer autumn".split()
)
# "X of Y" kept whole when X is one of these
_OF_HEADS = frozenset(
    "cup cups glass glasses bottle bottles plate plates bowl bowls piece pieces slice slices pair pairs group "
    "groups bunch bunches pile piles stack stacks box boxes bag bags basket baskets jar jars can cans herd "
    "flock loaf mug mugs pot pots tray trays vase vases bouquet".split()
)
# -ed words that are nouns, not participles
_ED_NOUNS = frozenset("bed beds shed sheds seed seeds speed weed weeds seaweed sled sleds steed reed reeds "
                      "hundred hundreds tweed".split())
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


class RulePhraseExtractor(PhraseExtractor):
    """Noun phrases from a caption by the stop-word grammar above; at most ``max_phrases``."""

    name = "rules"
    fingerprint_params = ("max_phrases", "max_words")

    def __init__(self, max_phrases: int = 8, max_words: int = 4):
        self.max_phrases = max_phrases
        self.max_words = max_words

    def phrases(self, caption: str) -> list[str]:
        tokens = _TOKEN.findall(caption.lower())
        pieces: list[list[str]] = [[]]
        for i, tok in enumerate(tokens):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            prev = pieces[-1][-1] if pieces[-1] else ""
            if tok == "of" and prev in _OF_HEADS and nxt and nxt not in _BREAKS:
                pieces[-1].append(tok)
            elif not tok[0].isalnum() or tok in _BREAKS or _is_verb_ing(tok) or _is_participle(tok, prev, nxt):
                pieces.append([])
            else:
                pieces[-1].append(tok)
        out: list[str] = []
        for piece in pieces:
            phrase = _clean(piece, self.max_words)
            if phrase and phrase not in out:
                out.append(phrase)
            if len(out) >= self.max_phrases:
                break
        return out


def _is_verb_ing(tok: str) -> bool:
    return len(tok) > 4 and tok.endswith("ing") and tok not in _ING_NOUNS


def _is_participle(tok: str, prev: str, nxt: str) -> bool:
    """An -ed word after a word of its piece with no noun after it: a verb ("rocket launched into")."""
    ends_piece = not nxt or nxt in _BREAKS or not nxt[0].isalnum() or _is_verb_ing(nxt)
    return (len(tok) > 4 and tok.endswith("ed") and tok not in _ED_NOUNS and ends_piece and bool(prev)
            and prev not in _DETERMINERS)


def _clean(words: list[str], max_words: int) -> str:
    # leading determiners and numbers go, but not a group word that heads "X of Y" ("a bunch of coins")
    while words and (words[0] in _DETERMINERS or words[0].isdigit()) and words[1:2] != ["of"]:
        words = words[1:]
    while words and (words[-1] in _DETERMINERS or words[-1].isdigit()):
        words = words[:-1]
    if not words or words[-1] in _NOT_OBJECTS or words[-1] in _TIMES:
        return ""
    words = [w for w in words if w not in _NOT_OBJECTS]  # "arafed cat" -> "cat"
    return " ".join(words[-max_words:])


def parse_phrase_list(text: str) -> list[str]:
    """Phrases from a user list: one per line or comma/semicolon separated; blanks and '#' lines dropped."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"[,;]", line):
            part = " ".join(part.split())
            if part and part not in out:
                out.append(part)
    return out
