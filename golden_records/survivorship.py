"""Survivorship: one golden record per cluster, each value with its lineage.

Rules (first version): a value comes from the most trusted source, then the
most recently updated record, that has one; consent flags follow the most
recent explicit choice; the address is taken as a block (lines, street,
postcode, town, country) from one record, never mixed across records.
Everything is a sort plus a grouped `first()`, so it is vectorised.
"""

from __future__ import annotations

import pandas as pd

#: Golden attribute -> the record column it is taken from.
VALUE_ATTRIBUTES: dict[str, str] = {
    "civility": "civility_norm",
    "first_name": "first_name_norm",
    "last_name": "last_name_norm",
    "birth_name": "birth_name_norm",
    "birth_date": "birth_date",
    "email": "email_norm",
    "phone": "phone_norm",
    "company_name": "company_name_norm",
    "siren": "siren_norm",
    "siret": "siret_norm",
}
CONSENT_ATTRIBUTES: dict[str, str] = {
    "consent_email": "consent_email",
    "consent_sms": "consent_sms",
    "consent_post": "consent_post",
}
ADDRESS_BLOCK: dict[str, str] = {
    "address_lines": "address_lines",
    "street": "street_norm",
    "postcode": "postcode_norm",
    "city": "city_norm",
    "country": "country_norm",
}
GOLDEN_ATTRIBUTES: tuple[str, ...] = (
    tuple(VALUE_ATTRIBUTES) + tuple(ADDRESS_BLOCK) + tuple(CONSENT_ATTRIBUTES)
)


def _winners(
    frame: pd.DataFrame, cluster: pd.Series, columns: dict[str, str], rule: str
) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Per cluster, the first non-null value of each column in `frame`'s order."""
    rid = pd.Series(frame.index, index=frame.index)
    values = frame[list(columns.values())].set_axis(list(columns), axis=1)
    firsts = values.groupby(cluster.loc[frame.index], sort=True).first()
    lineage = []
    for attr, col in columns.items():
        won = rid.where(frame[col].notna()).groupby(cluster.loc[frame.index]).first().dropna()
        lineage.append(
            pd.DataFrame(
                {
                    "cluster": won.index,
                    "attribute": attr,
                    "record": won.astype("int64").to_numpy(),
                    "rule": rule,
                }
            )
        )
    return firsts, lineage


def survive(records: pd.DataFrame, cluster: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Golden values per cluster and the lineage of every value.

    `cluster` is aligned with `records` (one label per record). Returns
    (golden, lineage): golden is indexed by cluster; lineage has one row per
    (cluster, attribute) naming the winning record (positional id) and rule.
    """
    by_trust = records.sort_values(
        ["trust", "source_updated_at", "source", "source_key"],
        ascending=[False, False, True, True],
        na_position="last",
        kind="stable",
    )
    values, lineage = _winners(by_trust, cluster, VALUE_ATTRIBUTES, "trust_then_recent")

    by_recent = records.sort_values(
        ["source_updated_at", "trust", "source", "source_key"],
        ascending=[False, False, True, True],
        na_position="last",
        kind="stable",
    )
    consent, consent_lineage = _winners(
        by_recent, cluster, CONSENT_ATTRIBUTES, "most_recent_explicit"
    )

    # The address block: the best record that has a street and a postcode.
    complete = records["street_norm"].notna() & records["postcode_norm"].notna()
    ranked = records.assign(__complete=complete).sort_values(
        ["__complete", "trust", "source_updated_at", "source", "source_key"],
        ascending=[False, False, False, True, True],
        na_position="last",
        kind="stable",
    )
    best = ranked.groupby(cluster.loc[ranked.index], sort=True).head(1)
    has_address = best[list(ADDRESS_BLOCK.values())].notna().any(axis=1)
    best = best[has_address]
    address = best[list(ADDRESS_BLOCK.values())].set_axis(list(ADDRESS_BLOCK), axis=1)
    address.index = cluster.loc[best.index].to_numpy()
    address_lineage = [
        pd.DataFrame(
            {
                "cluster": address.index,
                "attribute": attr,
                "record": best.index.to_numpy(),
                "rule": "address_block",
            }
        )[best[col].notna().to_numpy()]
        for attr, col in ADDRESS_BLOCK.items()
    ]

    golden = values.join(address, how="left").join(consent, how="left")
    golden["record_type"] = records.groupby(cluster)["record_type"].first()
    golden["members"] = cluster.value_counts().reindex(golden.index)
    lineage_frame = pd.concat(lineage + consent_lineage + address_lineage, ignore_index=True)
    return golden[["record_type", "members", *GOLDEN_ATTRIBUTES]], lineage_frame
