// Test harness for sim/dram.py (tests/test_dram.py): wires only, plus a traffic generator.
//  s_axi_*   AXI4 slave (1-bit IDs, for cocotbext-axi's AxiMaster) -> m_axi__* (AxiDram)
//  s_axil__* AXI4-Lite slave (for sim.dram.AxiLiteMaster)          -> ram_axil_* (AxiLiteRam)
//  gen_rd_en / gen_wr_en: while high, m_axi__ is driven by a generator instead of s_axi_:
//  back-to-back 128-beat (4 KiB) INCR bursts in a 1 MiB window, rready / bready always 1,
//  wvalid always 1; gen_rd_beats / gen_wr_beats / gen_b count handshakes, gen_errors counts
//  rlast in the wrong place and non-OKAY responses. IDs: rid/bid are 0 (use arid/awid 0).
module edgemoe_dram_tb (
    input  wire         clk,
    input  wire         rst,
    // AXI4 slave side
    input  wire         s_axi_awid,
    input  wire [31:0]  s_axi_awaddr,
    input  wire [7:0]   s_axi_awlen,
    input  wire [2:0]   s_axi_awsize,
    input  wire [1:0]   s_axi_awburst,
    input  wire         s_axi_awvalid,
    output wire         s_axi_awready,
    input  wire [255:0] s_axi_wdata,
    input  wire [31:0]  s_axi_wstrb,
    input  wire         s_axi_wlast,
    input  wire         s_axi_wvalid,
    output wire         s_axi_wready,
    output wire         s_axi_bid,
    output wire [1:0]   s_axi_bresp,
    output wire         s_axi_bvalid,
    input  wire         s_axi_bready,
    input  wire         s_axi_arid,
    input  wire [31:0]  s_axi_araddr,
    input  wire [7:0]   s_axi_arlen,
    input  wire [2:0]   s_axi_arsize,
    input  wire [1:0]   s_axi_arburst,
    input  wire         s_axi_arvalid,
    output wire         s_axi_arready,
    output wire         s_axi_rid,
    output wire [255:0] s_axi_rdata,
    output wire [1:0]   s_axi_rresp,
    output wire         s_axi_rlast,
    output wire         s_axi_rvalid,
    input  wire         s_axi_rready,
    // AXI4 master side (AxiDram)
    output wire [31:0]  m_axi__awaddr,
    output wire [7:0]   m_axi__awlen,
    output wire [2:0]   m_axi__awsize,
    output wire [1:0]   m_axi__awburst,
    output wire         m_axi__awvalid,
    input  wire         m_axi__awready,
    output wire [255:0] m_axi__wdata,
    output wire [31:0]  m_axi__wstrb,
    output wire         m_axi__wlast,
    output wire         m_axi__wvalid,
    input  wire         m_axi__wready,
    input  wire [1:0]   m_axi__bresp,
    input  wire         m_axi__bvalid,
    output wire         m_axi__bready,
    output wire [31:0]  m_axi__araddr,
    output wire [7:0]   m_axi__arlen,
    output wire [2:0]   m_axi__arsize,
    output wire [1:0]   m_axi__arburst,
    output wire         m_axi__arvalid,
    input  wire         m_axi__arready,
    input  wire [255:0] m_axi__rdata,
    input  wire [1:0]   m_axi__rresp,
    input  wire         m_axi__rlast,
    input  wire         m_axi__rvalid,
    output wire         m_axi__rready,
    // AXI4-Lite slave side (AxiLiteMaster)
    input  wire [31:0]  s_axil__awaddr,
    input  wire         s_axil__awvalid,
    output wire         s_axil__awready,
    input  wire [31:0]  s_axil__wdata,
    input  wire [3:0]   s_axil__wstrb,
    input  wire         s_axil__wvalid,
    output wire         s_axil__wready,
    output wire [1:0]   s_axil__bresp,
    output wire         s_axil__bvalid,
    input  wire         s_axil__bready,
    input  wire [31:0]  s_axil__araddr,
    input  wire         s_axil__arvalid,
    output wire         s_axil__arready,
    output wire [31:0]  s_axil__rdata,
    output wire [1:0]   s_axil__rresp,
    output wire         s_axil__rvalid,
    input  wire         s_axil__rready,
    // AXI4-Lite master side (AxiLiteRam)
    output wire [31:0]  ram_axil_awaddr,
    output wire         ram_axil_awvalid,
    input  wire         ram_axil_awready,
    output wire [31:0]  ram_axil_wdata,
    output wire [3:0]   ram_axil_wstrb,
    output wire         ram_axil_wvalid,
    input  wire         ram_axil_wready,
    input  wire [1:0]   ram_axil_bresp,
    input  wire         ram_axil_bvalid,
    output wire         ram_axil_bready,
    output wire [31:0]  ram_axil_araddr,
    output wire         ram_axil_arvalid,
    input  wire         ram_axil_arready,
    input  wire [31:0]  ram_axil_rdata,
    input  wire [1:0]   ram_axil_rresp,
    input  wire         ram_axil_rvalid,
    output wire         ram_axil_rready,
    // traffic generator
    input  wire         gen_rd_en,
    input  wire         gen_wr_en,
    output reg  [31:0]  gen_rd_beats,
    output reg  [31:0]  gen_wr_beats,
    output reg  [31:0]  gen_b,
    output reg  [31:0]  gen_errors
);
    // ---- read generator ----
    reg [31:0] g_araddr;
    reg        g_arvalid;
    reg [6:0]  g_rbeat;
    always @(posedge clk) begin
        if (rst || !gen_rd_en) begin
            g_araddr <= 32'h0;
            g_arvalid <= 1'b0;
        end else begin
            g_arvalid <= 1'b1;
            if (g_arvalid && m_axi__arready)
                g_araddr <= (g_araddr + 32'd4096) & 32'h000F_FFFF;
        end
    end
    // ---- write generator ----
    reg [31:0] g_awaddr;
    reg        g_awvalid;
    reg        g_wvalid;
    reg [6:0]  g_wbeat;
    always @(posedge clk) begin
        if (rst || !gen_wr_en) begin
            g_awaddr <= 32'h0;
            g_awvalid <= 1'b0;
            g_wvalid <= 1'b0;
            g_wbeat <= 7'd0;
        end else begin
            g_awvalid <= 1'b1;
            g_wvalid <= 1'b1;
            if (g_awvalid && m_axi__awready)
                g_awaddr <= (g_awaddr + 32'd4096) & 32'h000F_FFFF;
            if (g_wvalid && m_axi__wready)
                g_wbeat <= g_wbeat + 7'd1;
        end
    end
    // ---- counters ----
    always @(posedge clk) begin
        if (rst) begin
            gen_rd_beats <= 0; gen_wr_beats <= 0; gen_b <= 0; gen_errors <= 0; g_rbeat <= 0;
        end else begin
            if (gen_rd_en && m_axi__rvalid) begin
                gen_rd_beats <= gen_rd_beats + 1;
                g_rbeat <= g_rbeat + 7'd1;
                if (m_axi__rlast != (g_rbeat == 7'd127) || m_axi__rresp != 2'd0)
                    gen_errors <= gen_errors + 1;
            end
            if (gen_wr_en && m_axi__wvalid && m_axi__wready)
                gen_wr_beats <= gen_wr_beats + 1;
            if (gen_wr_en && m_axi__bvalid) begin
                gen_b <= gen_b + 1;
                if (m_axi__bresp != 2'd0)
                    gen_errors <= gen_errors + 1;
            end
        end
    end

    // ---- AXI4 mux: generator or s_axi_ ----
    assign m_axi__araddr  = gen_rd_en ? g_araddr  : s_axi_araddr;
    assign m_axi__arlen   = gen_rd_en ? 8'd127    : s_axi_arlen;
    assign m_axi__arsize  = gen_rd_en ? 3'd5      : s_axi_arsize;
    assign m_axi__arburst = gen_rd_en ? 2'd1      : s_axi_arburst;
    assign m_axi__arvalid = gen_rd_en ? g_arvalid : s_axi_arvalid;
    assign m_axi__rready  = gen_rd_en ? 1'b1      : s_axi_rready;
    assign s_axi_arready  = gen_rd_en ? 1'b0      : m_axi__arready;
    assign s_axi_rid      = 1'b0;
    assign s_axi_rdata    = m_axi__rdata;
    assign s_axi_rresp    = m_axi__rresp;
    assign s_axi_rlast    = m_axi__rlast;
    assign s_axi_rvalid   = gen_rd_en ? 1'b0      : m_axi__rvalid;

    assign m_axi__awaddr  = gen_wr_en ? g_awaddr  : s_axi_awaddr;
    assign m_axi__awlen   = gen_wr_en ? 8'd127    : s_axi_awlen;
    assign m_axi__awsize  = gen_wr_en ? 3'd5      : s_axi_awsize;
    assign m_axi__awburst = gen_wr_en ? 2'd1      : s_axi_awburst;
    assign m_axi__awvalid = gen_wr_en ? g_awvalid : s_axi_awvalid;
    assign m_axi__wdata   = gen_wr_en ? {8{gen_wr_beats}} : s_axi_wdata;
    assign m_axi__wstrb   = gen_wr_en ? 32'hFFFF_FFFF : s_axi_wstrb;
    assign m_axi__wlast   = gen_wr_en ? (g_wbeat == 7'd127) : s_axi_wlast;
    assign m_axi__wvalid  = gen_wr_en ? g_wvalid  : s_axi_wvalid;
    assign s_axi_awready  = gen_wr_en ? 1'b0      : m_axi__awready;
    assign s_axi_wready   = gen_wr_en ? 1'b0      : m_axi__wready;
    assign m_axi__bready  = gen_wr_en ? 1'b1      : s_axi_bready;
    assign s_axi_bid      = 1'b0;
    assign s_axi_bresp    = m_axi__bresp;
    assign s_axi_bvalid   = gen_wr_en ? 1'b0      : m_axi__bvalid;

    // ---- AXI4-Lite passthrough ----
    assign ram_axil_awaddr  = s_axil__awaddr;
    assign ram_axil_awvalid = s_axil__awvalid;
    assign s_axil__awready  = ram_axil_awready;
    assign ram_axil_wdata   = s_axil__wdata;
    assign ram_axil_wstrb   = s_axil__wstrb;
    assign ram_axil_wvalid  = s_axil__wvalid;
    assign s_axil__wready   = ram_axil_wready;
    assign s_axil__bresp    = ram_axil_bresp;
    assign s_axil__bvalid   = ram_axil_bvalid;
    assign ram_axil_bready  = s_axil__bready;
    assign ram_axil_araddr  = s_axil__araddr;
    assign ram_axil_arvalid = s_axil__arvalid;
    assign s_axil__arready  = ram_axil_arready;
    assign s_axil__rdata    = ram_axil_rdata;
    assign s_axil__rresp    = ram_axil_rresp;
    assign s_axil__rvalid   = ram_axil_rvalid;
    assign ram_axil_rready  = s_axil__rready;
endmodule
