// `bench cluster`'s engine ceiling: plain puts straight into HBase with its own Java client.
//
// Usage: java -cp "HBASE_JARS/*" HBasePuts.java ZK_HOST ZK_PORT TABLE THREADS SECONDS VALUE_BYTES
// Every thread has a Table of its own on one shared Connection (HBase's client multiplexes
// its region server RPCs), and puts one cell of VALUE_BYTES into family "m" of rows shaped
// like the store's (a salt byte, then an 8-byte user id), one put per call, auto-flushed:
// each put is acknowledged (in the write-ahead log) before the thread sends the next. After a
// first put of every thread and a one-second warm-up it counts the puts of SECONDS and prints {"ops_per_s": N, "puts": N}.

import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hbase.HBaseConfiguration;
import org.apache.hadoop.hbase.TableName;
import org.apache.hadoop.hbase.client.Connection;
import org.apache.hadoop.hbase.client.ConnectionFactory;
import org.apache.hadoop.hbase.client.Put;
import org.apache.hadoop.hbase.client.Table;

public class HBasePuts {
    public static void main(String[] args) throws Exception {
        Configuration conf = HBaseConfiguration.create();
        conf.set("hbase.zookeeper.quorum", args[0]);
        conf.set("hbase.zookeeper.property.clientPort", args[1]);
        TableName table = TableName.valueOf(args[2]);
        int threads = Integer.parseInt(args[3]);
        double seconds = Double.parseDouble(args[4]);
        int valueBytes = Integer.parseInt(args[5]);
        byte[] family = {'m'};
        AtomicLong counted = new AtomicLong();
        List<Throwable> failures = java.util.Collections.synchronizedList(new ArrayList<>());
        // Set once every thread has made its first put (connected, found the region).
        long[] window = new long[2];
        java.util.concurrent.CyclicBarrier ready = new java.util.concurrent.CyclicBarrier(threads, () -> {
            window[0] = System.nanoTime() + 1_000_000_000L;
            window[1] = window[0] + (long) (seconds * 1e9);
        });
        try (Connection connection = ConnectionFactory.createConnection(conf)) {
            List<Thread> workers = new ArrayList<>();
            for (int t = 0; t < threads; t++) {
                final long user = 9_000_000L + t;
                Thread worker = new Thread(() -> {
                    try (Table writer = connection.getTable(table)) {
                        byte[] value = new byte[valueBytes];
                        long seq = 0;
                        boolean first = true;
                        long warmEnd = 0, end = 0;
                        while (true) {
                            long now = System.nanoTime();
                            if (!first && now >= end) break;
                            byte[] row = new byte[9];
                            row[0] = (byte) (user % 256);
                            for (int i = 0; i < 8; i++) row[1 + i] = (byte) (user >>> (56 - 8 * i));
                            ThreadLocalRandom.current().nextBytes(value);
                            Put put = new Put(row);
                            put.addColumn(family, ("p" + seq++).getBytes(), value);
                            writer.put(put);
                            if (first) {
                                first = false;
                                ready.await();
                                warmEnd = window[0];
                                end = window[1];
                            } else if (now >= warmEnd) {
                                counted.incrementAndGet();
                            }
                        }
                    } catch (Throwable e) {
                        failures.add(e);
                    }
                });
                workers.add(worker);
                worker.start();
            }
            for (Thread worker : workers) worker.join();
        }
        if (!failures.isEmpty()) {
            failures.get(0).printStackTrace();
            System.exit(1);
        }
        long puts = counted.get();
        System.out.println("{\"ops_per_s\": " + Math.round(puts / seconds) + ", \"puts\": " + puts + "}");
    }
}
