"""The AWS enclave's records: the DynamoDB table ``kotta-NAME-records``.

Key: ``kind`` (hash) and ``key`` (range); the value is a JSON string.  One kind's records
are one partition, read with ``Query`` in key order.  Conditional writes
(``attribute_not_exists``) make ``put(..., if_absent=True)`` a compare-and-set.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .base import Records, check_record_name, decode_record, is_record_name

if TYPE_CHECKING:
    from .aws import AwsEnclave


class DynamoRecords(Records):
    def __init__(self, enclave: AwsEnclave):
        from .aws import _DynamoTable

        self._t = _DynamoTable(enclave, enclave.names.records_table)

    @property
    def table(self) -> str:
        return self._t.table

    def get_many(self, kind, keys):
        from .aws import BATCH_ROUNDS, _backoff, _chunks

        out: dict[str, dict[str, Any]] = {}
        # a key no record can have has none: asked for (`kotta token revoke ""`), DynamoDB
        # refused the whole call with a ValidationException naming nothing
        keys = [k for k in dict.fromkeys(keys) if is_record_name(k)]
        if not is_record_name(kind):
            return out
        for chunk in _chunks(keys, 100):
            request = {
                self.table: {
                    "Keys": [{"kind": {"S": kind}, "key": {"S": k}} for k in chunk],
                    "ConsistentRead": True,
                }
            }
            for attempt in range(BATCH_ROUNDS):
                resp = self._t._call("batch_get_item", RequestItems=request)
                for item in (resp.get("Responses") or {}).get(self.table, []):
                    out[item["key"]["S"]] = json.loads(item["value"]["S"])
                request = resp.get("UnprocessedKeys") or {}
                if not request:
                    break
                _backoff(attempt)
            else:
                # a key DynamoDB did not answer for is not a key without a record
                raise RuntimeError("DynamoDB did not answer for some records")
        return out

    def put(self, kind, key, value, *, if_absent=False):
        from .aws import _client_error, _code

        check_record_name("kind", kind)
        check_record_name("key", key)
        item = {
            "kind": {"S": kind},
            "key": {"S": key},
            "value": {"S": json.dumps(value, separators=(",", ":"), sort_keys=True)},
        }
        kw: dict[str, Any] = {"TableName": self.table, "Item": item}
        if if_absent:
            kw["ConditionExpression"] = "attribute_not_exists(#k)"
            kw["ExpressionAttributeNames"] = {"#k": "key"}
            # a put whose response was lost is retried by botocore, and the retry finds
            # the record its first try wrote: that is ours, not another writer's
            kw["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        try:
            self._t._call("put_item", **kw)
        except _client_error() as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                return (exc.response.get("Item") or {}).get("value") == item["value"]
            raise
        return True

    def put_if_unchanged(self, kind, key, value, expect):
        from .aws import _client_error, _code

        check_record_name("kind", kind)
        check_record_name("key", key)
        # The stored text of each expected record, read afresh: the condition is that it
        # is still that text (records of an older version may be spelled otherwise than
        # this version's json.dumps would spell the value read)
        stored: dict[tuple[str, str], str] = {}
        for k, name in expect:
            resp = self._t._call("get_item", TableName=self.table, ConsistentRead=True,
                                 Key={"kind": {"S": k}, "key": {"S": name}})
            text = (resp.get("Item") or {}).get("value", {}).get("S")
            if text is None or json.loads(text) != expect[(k, name)]:
                return False
            stored[(k, name)] = text
        item = {
            "kind": {"S": kind},
            "key": {"S": key},
            "value": {"S": json.dumps(value, separators=(",", ":"), sort_keys=True)},
        }
        cond = {"ConditionExpression": "#v = :v", "ExpressionAttributeNames": {"#v": "value"}}
        put: dict[str, Any] = {"TableName": self.table, "Item": item}
        if (kind, key) in stored:
            put.update(cond, ExpressionAttributeValues={":v": {"S": stored[(kind, key)]}})
        else:
            put.update(ConditionExpression="attribute_not_exists(#k)",
                       ExpressionAttributeNames={"#k": "key"})
        items: list[dict[str, Any]] = [{"Put": put}]
        items += [{"ConditionCheck": {
            "TableName": self.table, "Key": {"kind": {"S": k}, "key": {"S": name}}, **cond,
            "ExpressionAttributeValues": {":v": {"S": text}}}}
            for (k, name), text in stored.items() if (k, name) != (kind, key)]
        try:  # (a transaction: DynamoDB checks every condition and writes as one step)
            self._t._call("transact_write_items", TransactItems=items)
        except _client_error() as exc:
            # a condition failed, or another transaction wrote one of these items at the
            # same time: either way the caller reads again and decides anew
            if _code(exc) == "TransactionCanceledException":
                return False
            raise
        return True

    def delete(self, kind, key):
        if not (is_record_name(kind) and is_record_name(key)):  # (as in get_many)
            return False
        resp = self._t._call(
            "delete_item",
            TableName=self.table,
            Key={"kind": {"S": kind}, "key": {"S": key}},
            ReturnValues="ALL_OLD",
        )
        return bool(resp.get("Attributes"))

    def scan(self, kind, *, after="", limit=None, reverse=False, tolerant=False):
        names = {"#p": "kind"}
        values: dict[str, Any] = {":p": {"S": kind}}
        cond = "#p = :p"
        if after:
            cond += " AND #k < :a" if reverse else " AND #k > :a"
            values[":a"] = {"S": after}
            names["#k"] = "key"
        kw: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": cond,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ScanIndexForward": not reverse,
            "ConsistentRead": True,
        }
        out: list[tuple[str, dict[str, Any]]] = []
        while True:
            if limit is not None:
                kw["Limit"] = max(1, limit - len(out))
            resp = self._t._call("query", **kw)
            out += [(i["key"]["S"], decode_record(i["value"]["S"], tolerant=tolerant))
                    for i in resp.get("Items", [])]
            start = resp.get("LastEvaluatedKey")
            if not start or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out
            kw["ExclusiveStartKey"] = start


def records_table_spec(names) -> dict[str, Any]:
    return {
        "TableName": names.records_table,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": "kind", "AttributeType": "S"},
            {"AttributeName": "key", "AttributeType": "S"},
        ],
        "KeySchema": [
            {"AttributeName": "kind", "KeyType": "HASH"},
            {"AttributeName": "key", "KeyType": "RANGE"},
        ],
        "Tags": [{"Key": "kotta-enclave", "Value": names.name}],
    }
