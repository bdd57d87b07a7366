// The part of HBase's Thrift2 interface (THBaseService, HBase 2.x) the store calls:
// reading cells and the multi-cell compare-and-set that commits an append.
// Field ids and types follow the gateway's own IDL (hbase-thrift.jar,
// org/apache/hadoop/hbase/thrift2/hbase.thrift); only what is used is declared.

struct TColumn {
  1: required binary family,
  2: optional binary qualifier,
  3: optional i64 timestamp
}

struct TColumnValue {
  1: required binary family,
  2: required binary qualifier,
  3: required binary value,
  4: optional i64 timestamp
}

struct TResult {
  1: optional binary row,
  2: required list<TColumnValue> columnValues
}

struct TGet {
  1: required binary row,
  2: optional list<TColumn> columns
}

struct TPut {
  1: required binary row,
  2: required list<TColumnValue> columnValues
}

struct TTableName {
  1: optional binary ns,
  2: required binary qualifier
}

exception TIOError {
  1: optional string message,
  2: optional bool canRetry
}

exception TIllegalArgument {
  1: optional string message
}

service THBaseService {
  TResult get(1: required binary table, 2: required TGet tget) throws (1: TIOError io)

  bool checkAndPut(
    1: required binary table,
    2: required binary row,
    3: required binary family,
    4: required binary qualifier,
    // absent: the check is that the cell does not exist
    5: binary value,
    6: required TPut tput
  ) throws (1: TIOError io)

  list<TTableName> getTableNamesByPattern(
    1: optional string regex,
    2: required bool includeSysTables
  ) throws (1: TIOError io)
}
