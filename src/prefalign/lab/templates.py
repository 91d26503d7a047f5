"""Sentence frames of the procedural movie-review corpus, grouped by what a sentence does.

Slots in braces are filled by ``prefalign.lab.corpus``. A trailing digit asks for a second,
different value from the same pool ({aspect2}). Polar slots ({adj}, {adv}, {noun}, {verb},
{feeling}, {rec}, {again}, {rating}, {opp}) follow the sentence's polarity and intensity;
{padj}/{nadj}, {pverb}/{nverb}, {pnoun}/{nnoun} are the positive/negative ones of mixed frames.
"""
from __future__ import annotations

from prefalign.lab.lexicon import words

# Neutral: how the reviewer met the film.
OPENING = words("""
I watched {title} {when} {venue} with {companion}. | I saw {title} {venue} {when}. |
{title} is a {year} {genre} directed by {name}. | {title} is a {desc} {genre} set in {place}. |
This {genre} from {year} runs about {minutes} minutes. | Directed by {name}, {title} came out in {year}. |
I went into {title} knowing nothing about it. | I had heard a lot about {title} before I saw it. |
{title} finally turned up {venue}. | This is the new {genre} from {name}. |
{name} wrote and directed this {desc} {genre}. | I rented {title} {when}. |
{title} was shot in {place} in {year}. | {title} is the debut feature of {name}. |
It is a remake of a {desc} {genre} from {year}. | I watched this one {when} because {companion} insisted. |
{title} ({year}) is a {genre} about {object}. | Based on a novel by {name}, {title} is a {desc} {genre}. |
{title} premiered {venue} in {year}. | I caught {title} {venue} with {companion} {when}. |
So I finally saw {title}. | Here are my thoughts on {title}. | {title} is a {genre} in the {desc} tradition. |
I brought {snack} and settled in. | {title} is a {genre} set {era}. | I watched {title} {when}, armed with {snack}. |
{title} is a {desc} {genre} about {theme}. | It was {weather} outside, so I stayed in and watched {title}.
""")

# Neutral: what happens in the film.
PLOT = words("""
{first} {plotverb} {object} in {place}. | The story follows a {role} who {plotverb} {object}. |
{name} plays a {trait} {role} who {journey} {place}. | {first} and {first2} {verb} {object} together. |
When {object} turns up in {place}, a {role} has to {verb} it. | The plot centres on a {role} from {place}. |
{first}, a {role}, {journey} {place} to {verb} {object}. | Years later, {first} {journey} {place} and {plotverb} {object}. |
Most of the film takes place in {place}. | The film cuts between {place} and {place2}. |
{name} plays the {role}, and {name2} plays a {role2}. | It is about a {role} who {plotverb} {object}. |
The {role} is played by {name}. | Along the way, {first} meets a {trait} {role}. |
The second half moves to {place}. | Everything hinges on {object}. | There is also a subplot about {object}. |
The running time is {minutes} minutes. | {first} spends most of the film trying to {verb} {object}. |
A {role} and a {role2} {verb} {object} in {place}. | The film opens in {place} in {year}. |
{first} is a {role} who {journey} {place}. | The {role} and the {role2} never quite trust each other. |
Meanwhile, a {role} named {first} {plotverb} {object}. | {first}, a {trait} {role}, {plotverb} {object}. |
The story is set in {place} {era}. | At heart it is a film about {theme} and {theme2}. | The film is really about {theme}. |
{first} is followed by {animal} for most of the story. | The score leans on {instrument}. |
Much of it is drenched in {colour} and {colour2} light. | A {trait} {role} {journey} {place} {era}. |
The film asks what {theme} costs a {trait} {role}. | The {trait2} {role2} turns out to be {first}. |
{first} works as a {role} in {place} until {event}. | Then {event}, and nothing is the same. |
{first} has to {verb} the {relative} of a {trait} {role}. | The {relative} is played by {name}.
""")

# Polar: one opinion about one thing.
OPINION = words("""
The {aspect} is {adv} {adj}. | The {aspect} was {adv} {adj}. | {name} is {adv} {adj} as the {role}. |
{name} {pv} as the {role}. | The {aspect} and the {aspect2} are both {adv} {adj}. | What a {adv} {adj} {genre}. |
This is a {adv} {adj} film. | It is {adv} {adj} from start to finish. | I found the {aspect} {adv} {adj}. |
The {aspect} felt {adv} {adj} to me. | {title} is a {noun}. | Simply put, {title} is a {adv} {adj} {noun}. |
I left the theatre feeling {feeling}. | By the end I was {adv} {feeling}. | Every scene with {name} is {adj}. |
The way the film handles the {aspect} is {adv} {adj}. | As a {genre}, it is {adv} {adj}. |
The direction by {name} is {adv} {adj}. | The {aspect} is never {opp}. | Nothing about the {aspect} is {opp}. |
I {rec} it to {audience}. | {title} is {adv} {adj}, and the {aspect} is {adj2}. | Even the {aspect} is {adj}. |
There is nothing {opp} about it. | The {aspect} makes the film feel {adv} {adj}. | {first} is a {adv} {adj} character. |
The performances are {adv} {adj} across the board. | Watching it was a {adv} {adj} experience. |
The {aspect} left me {feeling}. | The {aspect} is {adj}, the {aspect2} is {adj2}, and the {aspect3} is {adj3}. |
In a word: {adj}. | The audience around me seemed {feeling}. | {name} and {name2} are {adv} {adj} together. |
This {genre} is {adv} {adj} and {adj2}. | The {aspect} is {adv} {adj}; the {aspect2} even more so. |
{name} {pv}, and the {aspect} is {adv} {adj}. | The {aspect} is {adj}, {adv} {adj2}. |
I thought the {aspect} was {adv} {adj}. | When I asked, {companion} said it was {adv} {adj}. |
It is a {adj} {genre} with a {adj2} {aspect}. | The {aspect} in the {aspect2} scene is {adv} {adj}. |
The {aspect} of {title} is {adv} {adj}. | How {adj} the {aspect} is! | It is not often a {genre} is this {adj}. |
It is {mly} {craft}. | The whole thing is {mly} {craft} and {mly2} {craft2}. | {name} plays the {role} {mly}. |
The film treats {theme} {mly}. | The use of {colour} in the {aspect} is {adv} {adj}. |
The score, all {instrument}, is {adv} {adj}. | Its take on {theme} is {adv} {adj}. |
Even {animal} could tell you the {aspect} is {adj}.
""")

# Polar: the closing judgement.
VERDICT = words("""
Overall, a {adv} {adj} {genre}. | Rating: {rating} out of 10. | I {rec} it to {audience}. |
Final verdict: {noun}. | I {again} watch it again. | It is a {noun} from start to finish. |
{title} is {adv} {adj}. | {rating}/10. | In the end, a {adj} {noun}. | All told, it is {adv} {adj}. |
{title} is a {adj} film and a {noun}. | I {again} sit through it again. | A {mly} {craft} {genre}. |
{title}: {adv} {adj}.
""")

# Mixed: praise and complaint in one sentence.
CONTRAST = words("""
The {aspect} is {padj}, but the {aspect2} is {nadj}. | The {aspect} is {nadj}, but the {aspect2} is {padj}. |
{name} {pverb}, yet the {aspect} is {nadj}. | Despite a {padj} {aspect}, the film is {nadj} overall. |
Although the {aspect} is {nadj}, the {aspect2} is {padj}. | It is {padj} in places and {nadj} in others. |
The first half is {padj}; the second half is {nadj}. | The first half is {nadj}; the second half is {padj}. |
I wanted to love it, and the {aspect} is {padj}, but the {aspect2} is {nadj}. |
{name} is {padj}, while {name2} {nverb}. | The {aspect} is {nadj}, although the {aspect2} almost makes up for it. |
For every {padj} moment there is a {nadj} one. | A {padj} premise wasted on a {nadj} script. |
Parts of it are {padj}, parts of it are {nadj}. | I admired the {aspect} but found the {aspect2} {nadj}. |
The {aspect} is {padj} enough, if a little {nadj}. | Not a {nnoun}, not a {pnoun} either. |
{name} {nverb}, but the {aspect} is {padj}. | The {aspect} is a {pnoun}; the {aspect2} is a {nnoun}. |
It starts {padj} and ends {nadj}. | It starts {nadj} and ends {padj}. | Rating: {midrating} out of 10. |
{pmly} {craft}, but {nmly} {craft2}. | {nmly} {craft}, but {pmly} {craft2}. |
The film says something {padj} about {theme}, but says it {nmly}.
""")

# Neutral: a closing line that takes no side.
SHRUG = words("""
Make of it what you will. | I have no strong feelings about it either way. |
It is the kind of {genre} you watch once. | Your mileage may vary. | It does what it says on the tin. |
Rating: {midrating} out of 10. | It is a {desc} {genre}, nothing more and nothing less. |
I am still thinking about what it means. | It is exactly what the trailer promised. |
Whether it works will depend on what you expect from a {genre}. |
If you like films about {theme}, it might be for you. | It is a film about {theme}, and it knows it.
""")

GROUPS = {"opening": OPENING, "plot": PLOT, "opinion": OPINION, "verdict": VERDICT,
          "contrast": CONTRAST, "shrug": SHRUG}
